"""`python -m benchmarks.profile_engine`: where promptswap's engine spends a workload's time.

Serves the benchmark's workload (burst arrivals) once with the engine and reports:
- a phase split of the engine loop (schedule, admit, forward pass, sampling, token hand-off),
  timed by wrapping the engine's methods (the wrappers add a few microseconds a call);
- torch.profiler's operator table, recorded inside the engine thread (the profiler sees only
  the thread that starts it), and a Chrome trace to open in chrome://tracing or Perfetto.

It reaches into the engine's private methods on purpose: it is a measuring tool, not an API user.
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.run import DEFAULT_OUT, _int_list, _range


class PhaseTimer:
    """Accumulates wall time per named phase; wraps callables so each call is timed and labelled."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        from torch.profiler import record_function

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            with record_function(name):  # also a labelled region in the torch trace
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1

        return timed

    def table(self, total_s: float) -> str:
        lines = [f"{'phase':<36}{'calls':>8}{'total s':>10}{'share':>8}{'ms/call':>10}", "-" * 72]
        for name, secs in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            n = self.calls[name]
            lines.append(f"{name:<36}{n:>8}{secs:>10.2f}{secs / total_s:>8.0%}{1000 * secs / max(n, 1):>10.2f}")
        return "\n".join(lines)


class StepShapes:
    """Forward passes split by what they held: decode-only steps against steps with prefill chunks."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[int, float]]] = defaultdict(list)  # kind -> (tokens, seconds)

    def wrap(self, run):
        @functools.wraps(run)
        def timed(batch, prefixes=()):
            start = time.perf_counter()
            try:
                return run(batch, prefixes)
            finally:
                kind = "decode only" if all(n == 1 for _, n in batch) and not prefixes else "with prefill"
                self.rows[kind].append((sum(n for _, n in batch), time.perf_counter() - start))

        return timed

    def table(self) -> str:
        lines = [f"{'forward passes':<20}{'steps':>8}{'tokens/step':>13}{'ms/step':>10}{'ms/token':>10}", "-" * 61]
        for kind, rows in sorted(self.rows.items()):
            tokens, secs = sum(t for t, _ in rows), sum(s for _, s in rows)
            lines.append(f"{kind:<20}{len(rows):>8}{tokens / len(rows):>13.1f}{1000 * secs / len(rows):>10.1f}"
                         f"{1000 * secs / tokens:>10.2f}")
        return "\n".join(lines)


def instrument(engine, timer: PhaseTimer, shapes: StepShapes) -> None:
    import server.engine.loop as engine_module

    engine.runner.run = shapes.wrap(engine.runner.run)

    engine.scheduler.schedule = timer.wrap("scheduler.schedule", engine.scheduler.schedule)
    engine.executor._prepare_prefixes = timer.wrap("executor._prepare_prefixes (new task prefixes)",
                                                   engine.executor._prepare_prefixes)
    engine.runner.prepare = timer.wrap("runner.prepare (KV storage grown, shrunk, cleared)", engine.runner.prepare)
    engine.runner.run = timer.wrap("runner.run (forward pass)", engine.runner.run)
    engine.scheduler.postprocess = timer.wrap("scheduler.postprocess (detok + push + finish)",
                                              engine.scheduler.postprocess)
    engine.runner.write_prefix = timer.wrap("runner.write_prefix (prefix tables)", engine.runner.write_prefix)
    engine_module.logits.process = timer.wrap("logits.process (sample, log-probabilities, scores)",
                                              engine_module.logits.process)


def profile_in_engine_thread(engine, timer: PhaseTimer, trace: Path | None, with_torch: bool):
    """Wrap the loop's step so the profiler starts and stops inside the engine thread."""
    from torch.profiler import ProfilerActivity, profile

    state = {"prof": None, "steps": 0}
    done = threading.Event()
    timed_step = timer.wrap("engine.step (whole)", engine.step)

    def profiled_step():
        if state["prof"] is None and with_torch:
            state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            state["prof"].start()
        timed_step()
        state["steps"] += 1
        if not engine.scheduler.has_work() and engine.stats().waiting == 0:
            if state["prof"] is not None:
                state["prof"].stop()
                if trace is not None:
                    state["prof"].export_chrome_trace(str(trace))
            done.set()

    engine.step = profiled_step
    return state, done


# The ops that do a step's arithmetic and memory work (matrix products, attention, the KV pages' copies) and the
# compiled graphs' own kernels: a step's profiler self time outside them is host time (Python, dispatch, guards,
# small eager ops). An approximation: a compiled graph's call also holds its wrapper's few Python lines.
KERNEL_OPS = ("_linear_pointwise", "scaled_dot_product", "flash_attention", "aten::mm", "aten::bmm", "aten::addmm",
              "aten::index_select", "aten::index_put", "_weight_int", "CompiledFxGraph")


def host_ms_per_step(prof, steps: int) -> tuple[float, float]:
    """(host ms, kernel ms) per step from the profiler's per-op self times."""
    kernel = host = 0.0
    for event in prof.key_averages():
        if event.key.startswith("engine.step") or event.key.startswith("runner.") or event.key.startswith(
                ("scheduler.", "executor.", "logits.")):
            continue  # the phase labels (record_function): their time is their children's
        if any(op in event.key for op in KERNEL_OPS):
            kernel += event.self_cpu_time_total
        else:
            host += event.self_cpu_time_total
    return host / 1000 / max(steps, 1), kernel / 1000 / max(steps, 1)


def weight_bytes_per_step(model) -> int:
    """Bytes a decode step reads in full: every matrix product's weight (packed or not)."""
    import torch

    total = 0
    for module in model.modules():
        weight = getattr(module, "packed_weight", None)
        if weight is None and isinstance(module, torch.nn.Linear):
            weight = module.weight
        if weight is not None:
            total += weight.numel() * weight.element_size()
    return total


def read_rate(threads: int, size_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second this machine's memory gives a sum over `size_bytes` of float32, best of `repeats`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(size_bytes // 4)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - start)
        return size_bytes / best
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-random")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--concurrency", type=_int_list, default=[64], help="max running (first value used)")
    p.add_argument("--max-new-tokens", type=_range, default=(64, 64))
    p.add_argument("--text-len", type=_range, default=(32, 128))
    p.add_argument("--max-tokens-per-step", type=int, default=512)
    p.add_argument("--no-tasks", action="store_true", help="the same texts with no task")
    p.add_argument("--no-torch-profiler", action="store_true", help="phase split only (lower overhead)")
    p.add_argument("--no-compile", action="store_true", help="the eager step (server/engine/compiled.py)")
    p.add_argument("--threads", type=int, default=None, help="the engine's threads (default: the machine's cores)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    from benchmarks import promptswap_engine as pe
    from benchmarks import threads
    from benchmarks.models import resolve_model
    from benchmarks.throughput import warmup_workload
    from benchmarks.workload import WorkloadSpec, embedding_std, make_workload

    threads.configure(args.threads)  # before any model loads: the engine thread alone gets torch's threads

    model_path = resolve_model(args.model, args.out)
    base = pe.load_base(model_path, args.device, args.dtype)
    spec = WorkloadSpec(num_requests=args.requests, num_tasks=args.tasks, text_len=args.text_len,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    workload = make_workload(spec, base.geometry, embedding_std(base.model), base.tokenizer)
    if args.no_tasks:
        workload = workload.without_tasks()
    engine = pe.start_engine(base, pe.make_registry(base, workload), args.concurrency[0], args.max_tokens_per_step,
                             compile=not args.no_compile)
    print(f"step: {'compiled' if engine.compiled is not None else 'eager'}")
    try:
        pe.run_engine(engine, warmup_workload(workload))
        timer, shapes = PhaseTimer(), StepShapes()
        instrument(engine, timer, shapes)
        args.out.mkdir(parents=True, exist_ok=True)
        trace = None if args.no_torch_profiler else args.out / "engine_trace.json"
        state, done = profile_in_engine_thread(engine, timer, trace, not args.no_torch_profiler)
        start = time.perf_counter()
        results = pe.run_engine(engine, workload)
        wall = time.perf_counter() - start
        done.wait(timeout=60)
    finally:
        engine.shutdown(timeout_s=5.0)
    tokens = sum(len(r.token_ids) for r in results)
    print(f"{len(results)} requests, {tokens} tokens in {wall:.2f} s ({tokens / wall:.1f} tok/s, "
          f"profiler {'on' if trace else 'off'}); {state['steps']} engine steps "
          f"({1000 * wall / max(state['steps'], 1):.1f} ms/step)")
    print(timer.table(wall))
    print(shapes.table())
    weights, rate = weight_bytes_per_step(base.model), read_rate(engine_threads_used(engine))
    floor_ms = 1000 * weights / rate
    print(f"floor of a decode step: {weights / 1e6:.0f} MB of weights read at {rate / 1e9:.1f} GB/s (measured: a sum "
          f"over 512 MiB) = {floor_ms:.1f} ms/step, {1000 / floor_ms:.1f} tok/s at one request")
    if state["prof"] is not None:
        print(state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        print(f"wrote {trace}")
        host, kernel = host_ms_per_step(state["prof"], state["steps"])
        print(f"host time per step: {host:.2f} ms (kernels and copies {kernel:.2f} ms; profiler self times, "
              f"{'compiled' if engine.compiled is not None else 'eager'} step, {state['steps']} steps)")
    return 0


def engine_threads_used(engine) -> int:
    """The engine's thread count: what its compiled step was compiled for, else --threads, else every core."""
    from benchmarks import threads
    from server.machine.threads import usable_cpus

    compiled = engine.compiled
    if compiled is not None and compiled.threads:
        return compiled.threads
    return threads.engine_threads() or usable_cpus()


if __name__ == "__main__":
    sys.exit(main())
