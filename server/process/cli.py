"""The `promptswap` console script: one entry point, one sub-command per job.

Each sub-command lives beside the code it drives and adds itself here with an
`add_<name>_command(subparsers)` function that sets `run` (a callable taking the parsed args).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from importlib.metadata import PackageNotFoundError, version

from prompt_store.cli import add_prompts_command
from server.process.model_cli import add_model_command
from server.process.serve import add_serve_command
from server.train.cli import add_train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptswap", description="Multi-task soft-prompt server.")
    with contextlib.suppress(PackageNotFoundError):  # a source tree that is not installed has no version
        parser.add_argument("--version", action="version", version=version("promptswap"))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_prompts_command(subparsers)
    add_serve_command(subparsers)
    add_train_command(subparsers)
    add_model_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from server.process.logs import quiet_optional_libraries

    quiet_optional_libraries()  # before any command imports transformers, which imports torchao when installed
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:  # a bare `promptswap`: say what it can do
        parser.print_help()
        print("\nStart the server with `promptswap serve` (see `promptswap serve --help`).")
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
