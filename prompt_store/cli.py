"""`promptswap prompts inspect|convert`: look at a prompt file the way the registry would, offline.

    promptswap prompts inspect PATH [--model M] [--kind K] [--json]
    promptswap prompts convert PEFT_DIR OUT.safetensors [--model M] [--description D] [--force]

Exit codes: 0 valid / written, 1 the prompt is invalid, 2 a usage problem (missing path, bad model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prompt_store.dtypes import DTYPE_NAMES, torch_dtype
from prompt_store.geometry import KINDS


def add_prompts_command(subparsers) -> None:
    parser = subparsers.add_parser("prompts", help="inspect and convert prompt files (PEFT or promptswap)")
    actions = parser.add_subparsers(dest="prompts_action", metavar="ACTION", required=True)

    inspect = actions.add_parser(
        "inspect", help="print what the registry would store for a file or PEFT adapter directory"
    )
    inspect.add_argument("path", help="a .safetensors/.bin file or a PEFT adapter directory")
    _add_model_args(inspect)
    inspect.add_argument("--kind", choices=KINDS, help="the kind, for a bare file with no metadata")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(run=run_inspect)

    convert = actions.add_parser("convert", help="write a PEFT adapter directory as a promptswap prompt file")
    convert.add_argument("peft_dir", help="a PEFT prompt/prefix tuning adapter directory")
    convert.add_argument("out", help="the .safetensors file to write")
    _add_model_args(convert)
    convert.add_argument("--description", help="stored in the file's metadata")
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    convert.set_defaults(run=run_convert)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model directory (or cached name): also check against its shape")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="the dtype it would be served in")
    parser.add_argument("--max-virtual-tokens", type=int, default=256, metavar="N")


def run_inspect(args: argparse.Namespace) -> int:
    from prompt_store.errors import PromptError
    from prompt_store.format import read_path, tensor_sha256
    from prompt_store.validate import check_prompt

    setup = _setup(args)
    if isinstance(setup, int):
        return setup
    geometry, limits, dtype = setup
    report: dict = {"path": str(args.path), "valid": False, "problems": []}
    if geometry is not None:
        report["model"] = {"name": geometry.model_name, "hidden_size": geometry.hidden_size,
                           "prefix_width": geometry.prefix_width}  # fmt: skip
    try:
        source = read_path(args.path, max_bytes=limits.max_bytes)
        report.update(shape=list(source.embeddings.shape), dtype=source.dtype_name, metadata=source.metadata)
        if source.config is not None:
            report["peft_type"] = source.config.get("peft_type")
        checked = check_prompt(source, geometry=geometry, limits=limits, dtype=dtype, kind=args.kind)
    except PromptError as exc:
        report["problems"].append(f"{type(exc).__name__}: {exc}")
        _print_report(report, args.json)
        return 1
    report.update(
        valid=True, kind=checked.kind, num_virtual_tokens=checked.num_virtual_tokens, source=checked.source,
        base_model=checked.base_model, description=checked.description,
        sha256=tensor_sha256(checked.embeddings), served_dtype=args.dtype,
    )  # fmt: skip
    if checked.kind is None:
        report["notes"] = ["kind undetermined: the file says neither; give --kind or --model"]
    _print_report(report, args.json)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from prompt_store.errors import PromptError
    from prompt_store.format import atomic_write, read_peft_dir, write_prompt
    from prompt_store.validate import check_prompt

    setup = _setup(args)
    if isinstance(setup, int):
        return setup
    geometry, limits, dtype = setup
    peft_dir, out = Path(args.peft_dir), Path(args.out)
    if not peft_dir.is_dir():
        print(f"error: {peft_dir} is not a directory (expected a PEFT adapter directory)", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        source = read_peft_dir(peft_dir, max_bytes=limits.max_bytes)
        checked = check_prompt(source, geometry=geometry, limits=limits, dtype=dtype)
    except PromptError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    metadata = {
        "kind": checked.kind,
        "num_virtual_tokens": str(checked.num_virtual_tokens),
        "source": "peft",
        "peft_type": (source.config or {}).get("peft_type"),
        "base_model": checked.base_model,
        "description": args.description,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write_prompt(checked.stored, metadata))
    shape = list(checked.stored.shape)
    print(f"wrote {out}: {checked.kind}, {checked.num_virtual_tokens} virtual tokens, {shape} {source.dtype_name}")
    return 0


def _setup(args: argparse.Namespace):
    """(geometry or None, limits, dtype), or an exit code after printing why not."""
    from prompt_store.geometry import ModelGeometry
    from prompt_store.validate import RegistryLimits

    try:
        limits = RegistryLimits(max_virtual_tokens=args.max_virtual_tokens)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    geometry = None
    if args.model:
        from transformers import AutoConfig

        try:
            geometry = ModelGeometry.from_config(AutoConfig.from_pretrained(args.model), model_name=args.model)
        except (OSError, ValueError) as exc:
            print(f"error: cannot read the model config of {args.model!r}: {exc}", file=sys.stderr)
            return 2
    return geometry, limits, torch_dtype(args.dtype)


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    order = ("path", "valid", "kind", "num_virtual_tokens", "shape", "dtype", "served_dtype", "source",
             "peft_type", "base_model", "description", "sha256", "model", "metadata")  # fmt: skip
    for key in order:
        if report.get(key) not in (None, {}, []):
            print(f"{key}: {report[key]}")
    for note in report.get("notes", []):
        print(f"note: {note}")
    problems = report["problems"]
    print("problems: none" if not problems else "problems:")
    for problem in problems:
        print(f"  - {problem}")
