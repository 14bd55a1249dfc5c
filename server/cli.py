"""The `promptswap` console script: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptswap", description=__doc__)
    try:
        parser.add_argument("--version", action="version", version=version("promptswap"))
    except PackageNotFoundError:  # running from a source tree that is not installed
        pass
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
