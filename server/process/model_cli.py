"""`promptswap model path`: the local directory of the model `serve` and `train` load, so PEFT and transformers
can load the same weights (the demo's and a GGUF file's are converted into the cache, where no one would look).

    promptswap model path [--model M] [--gguf-file F] [--cache-dir D]
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('$(promptswap model path)')"

stdout is the directory alone; what is logged (the demo's notes, a first conversion) goes to stderr. A hub id is
printed as it is (from_pretrained takes it as serve does), with a note on stderr. Exit status: 0 printed; 2 the
model cannot be found or the options are wrong (one line on stderr says why).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from server.config import Settings, explain
from server.model.model_source import model_source
from server.process import startup

log = logging.getLogger("promptswap")


def add_model_command(subparsers) -> None:
    parser = subparsers.add_parser("model", help="where the served model's weights are, for PEFT and transformers")
    actions = parser.add_subparsers(dest="model_action", metavar="ACTION", required=True)
    path = actions.add_parser(
        "path", help="print the local directory of the model serve and train load",
        description="Print the local directory of the model `promptswap serve` and `promptswap train` load with "
        "these options (and the PROMPTSWAP_* variables, as they read them): the offline demo's converted "
        "directory, a GGUF file's converted directory, or --model as given. Converts first if needed. A hub id "
        "is printed as it is, with a note on stderr.",
    )
    path.add_argument("--model", help="as `promptswap serve --model`: a directory, a .gguf file, a hub id or "
                                      "random-demo (default: $PROMPTSWAP_MODEL, else the offline demo)")
    path.add_argument("--gguf-file", help="as `promptswap serve --gguf-file`: a GGUF file inside the --model directory")
    path.add_argument("--cache-dir", type=Path, help="as `promptswap serve --cache-dir`: where the demo model and "
                                                     "converted GGUF files live (default: $PROMPTSWAP_CACHE_DIR, "
                                                     "else ~/.cache/promptswap)")
    path.set_defaults(run=run_model_path)


def run_model_path(args: argparse.Namespace) -> int:
    given = {"model": args.model, "gguf_file": args.gguf_file, "cache_dir": args.cache_dir}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        print(f"promptswap model path: {'; '.join(explain(exc).splitlines())}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    model = settings.model
    if model is not None and _is_hub_id(settings, model):
        print(model)
        print(f"promptswap model path: {model} is a Hugging Face hub id, not a local directory; serve and train load "
              f"it by that id, as from_pretrained({model!r}) does{_cached(model)}", file=sys.stderr)
        return 0
    try:
        startup.check_model(settings)  # serve's checks: the path exists and holds a model it serves
    except startup.StartupError as exc:
        print(f"promptswap model path: {exc}", file=sys.stderr)
        return 2
    print(model_source(settings))
    return 0


def _is_hub_id(settings: Settings, model: str) -> bool:
    """As serve tells them apart (process/startup.py): not a demo, a GGUF file, an existing path or a path's
    shape."""
    return (not settings.demo and settings.gguf_path() is None and not Path(model).exists()
            and not startup._looks_like_a_path(model))


def _cached(model: str) -> str:
    """Where the Hugging Face cache holds the model's files, when it does."""
    import huggingface_hub

    with contextlib.suppress(Exception):  # an id the hub would refuse is not cached either
        config = huggingface_hub.try_to_load_from_cache(model, "config.json")
        if isinstance(config, str):
            return f" (cached in {Path(config).parent})"
    return ""
