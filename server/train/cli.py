"""`promptswap train`: examples in, a servable task out.

    promptswap train --data train.jsonl --kind prompt --num-virtual-tokens 20 --out adapters/sentiment \
        --template 'Review: {text}\\nSentiment:' [--model M] [--threads N] [--server URL --task NAME]

Exit status: 0 trained (and uploaded); 1 training or the upload failed; 2 bad data or options, or a
--server that would not take the upload (nothing trained).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from server.engine.config import describe_default
from server.train.peft_setup import DEFAULT_LR, KINDS

ADMIN_TOKEN_VARIABLE = "PROMPTSWAP_ADMIN_TOKEN"


def _positive(kind: type):
    def parse(value: str):
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return number
    return parse


def add_train_command(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a task (prompt tuning, P-tuning, prefix tuning) from JSONL examples",
        description="Train a soft prompt or prefix on the frozen base model with PEFT, from JSONL lines "
        '{"input": ..., "output": ...}. The output is a PEFT adapter directory that records its template and, '
        "for a classifier (at most 32 distinct outputs), its choices; --server uploads it.",
    )
    p.add_argument("--model", help="base model: a directory, a .gguf file or a hub id (default: the demo model "
                                   "`promptswap serve` serves without --model)")
    p.add_argument("--served-model-name", help="the base model's name on the server, recorded in the adapter "
                                               "(default: as `promptswap serve` names it)")
    p.add_argument("--cache-dir", type=Path, help="where the demo model and converted GGUF files live (as serve)")
    p.add_argument("--data", type=Path, required=True, help='JSONL training examples {"input": ..., "output": ...}')
    p.add_argument("--kind", choices=KINDS, default="prompt",
                   help="prompt: prompt tuning; ptuning: P-tuning (a prompt encoder); prefix: prefix tuning")
    p.add_argument("--num-virtual-tokens", type=_positive(int), default=20, help="virtual tokens (default 20)")
    p.add_argument("--out", type=Path, required=True, help="the adapter directory to write")
    p.add_argument("--template", help="how the input is framed, with {text} once, replaced literally (other braces "
                                      "are plain text); the server applies the same template to requests")
    p.add_argument("--init-text", help="prompt tuning: start the virtual tokens from this text's embeddings "
                                       "(default: random)")
    p.add_argument("--encoder-hidden-size", type=_positive(int),
                   help="P-tuning (and prefix tuning with --prefix-projection): the encoder's hidden size")
    p.add_argument("--prefix-projection", action="store_true", help="prefix tuning: learn through a projection")
    p.add_argument("--epochs", type=_positive(int), default=10, help="most epochs (default 10)")
    p.add_argument("--lr", type=_positive(float),
                   help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--batch-size", type=_positive(int), default=8, help="examples per step (default 8)")
    p.add_argument("--max-length", type=_positive(int), default=256,
                   help="most tokens of an example, input and output (default 256); a longer one is an error")
    p.add_argument("--val-split", type=float, help="share of the examples held out for validation (default 0.1)")
    p.add_argument("--val", type=Path, help="a JSONL file of validation examples (instead of --val-split)")
    p.add_argument("--patience", type=_positive(int), default=2,
                   help="stop after this many epochs without a better validation loss (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the base model's dtype while training (default float32)")
    p.add_argument("--threads", type=_positive(int), metavar="N",
                   help=f"torch's CPU threads while training (default, as for serve: {describe_default('threads')}); "
                        "fewer on a busy or shared machine")
    p.add_argument("--server", help="upload the result to this running server (PUT /prompts/{task})")
    p.add_argument("--task", help="the task name to upload as (with --server)")
    p.add_argument("--admin-token", help=f"the server's admin token (default: ${ADMIN_TOKEN_VARIABLE}). Prefer the "
                                         "variable: a flag is visible to every user in `ps`")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train)


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.init_text is not None and args.kind != "prompt":
        return "--init-text is for --kind prompt"
    if args.prefix_projection and args.kind != "prefix":
        return "--prefix-projection is for --kind prefix"
    if args.encoder_hidden_size is not None and not (args.kind == "ptuning" or args.prefix_projection):
        return "--encoder-hidden-size is for --kind ptuning, or --kind prefix with --prefix-projection"
    if args.val is not None and args.val_split is not None:
        return "give --val (a file) or --val-split (a share of --data), not both"
    if args.val_split is not None and not 0 <= args.val_split < 1:
        return f"--val-split must be in [0, 1), got {args.val_split}"
    if (args.server is None) != (args.task is None):
        return "--server and --task go together"
    if args.server is not None and not args.server.startswith(("http://", "https://")):
        return f"--server must be an http:// or https:// URL, got {args.server!r}"
    return None


def run_train(args: argparse.Namespace) -> int:
    problem = _usage_error(args)
    if problem:
        print(f"promptswap train: {problem}", file=sys.stderr)
        return 2
    if args.task is not None:
        from prompt_store.errors import InvalidTaskName
        from prompt_store.validate import check_task_name

        try:
            check_task_name(args.task)
        except InvalidTaskName as exc:
            print(f"promptswap train: --task: {exc}", file=sys.stderr)
            return 2
    if args.server is not None:  # before minutes of training: would the server take the result?
        from server.train.upload import ServerCheckFailed, check_server

        try:
            check_server(args.server, args.task, args.admin_token or os.environ.get(ADMIN_TOKEN_VARIABLE))
        except ServerCheckFailed as exc:
            print(f"promptswap train: --server: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from server.config import Settings
    from server.machine.threads import limit_interop_threads, threads_for
    from server.model.model_source import model_source
    from server.train.data import DataError
    from server.train.run import TrainOptions, train

    overrides = {"model": args.model, "served_model_name": args.served_model_name}
    if args.cache_dir is not None:
        overrides["cache_dir"] = args.cache_dir
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    # torch's threads as serve counts them (its default ignores a cgroup's CPU quota): the inter-op pool once,
    # before torch works; the intra-op threads for converting the demo here, and for training in fit().
    limit_interop_threads(args.threads)
    with threads_for(args.threads):
        model_path = model_source(settings)
    opts = TrainOptions(
        model_path=model_path, served_name=settings.model_name(), data=args.data, out=args.out,
        kind=args.kind, num_virtual_tokens=args.num_virtual_tokens, template=args.template,
        init_text=args.init_text, encoder_hidden_size=args.encoder_hidden_size,
        prefix_projection=args.prefix_projection, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, val_split=0.1 if args.val_split is None else args.val_split, val=args.val,
        patience=args.patience, seed=args.seed, device=args.device, dtype=args.dtype, progress=not args.quiet,
        threads=args.threads,
    )
    try:
        summary = train(opts)
    except DataError as exc:
        print(f"promptswap train: bad data, nothing trained: {exc}", file=sys.stderr)
        return 2
    print(describe(summary, opts))
    if args.server is None:
        return 0
    from server.train.upload import UploadFailed, upload

    try:
        stored = upload(args.server, args.task, args.out, args.admin_token or os.environ.get(ADMIN_TOKEN_VARIABLE))
    except UploadFailed as exc:
        print(f"promptswap train: upload failed: {exc}", file=sys.stderr)
        return 1
    print(f"uploaded   {args.task} v{stored.get('version')} to {args.server} "
          f"({stored.get('kind')}, {stored.get('num_virtual_tokens')} virtual tokens)")
    for warning in stored.get("warnings") or ():
        print(f"warning    {warning}")
    return 0


def describe(summary, opts) -> str:
    val = f", {summary.val_examples} validation" if summary.val_examples else ", no validation set"
    stop = " (stopped early: no better validation loss)" if summary.stopped_early else ""
    best = f"{summary.best_val_loss:.4f}" if summary.best_val_loss is not None else "-"
    if summary.choices:
        shown = ", ".join(summary.choices[:8]) + (", ..." if len(summary.choices) > 8 else "")
        choices = f"{len(summary.choices)} ({shown})"
    else:
        choices = "none (more than 32 distinct outputs)"
    lines = [
        f"trained    {opts.kind} task, {opts.num_virtual_tokens} virtual tokens, on {opts.served_name}",
        f"examples   {summary.train_examples} training{val}",
        f"epochs     {summary.epochs:g}{stop}",
        f"val loss   {best} (best)",
        f"accuracy   {summary.correct}/{summary.measured_on} = {100 * summary.accuracy:.1f}% exact match on the "
        f"{summary.accuracy_on} set (greedy)",
        f"choices    {choices}",
        f"time       {summary.seconds:.1f} s",
        f"output     {summary.out}",
    ]
    return "\n".join(lines)
