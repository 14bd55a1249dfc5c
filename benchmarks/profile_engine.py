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

    threads.configure(None)  # before any model loads: the engine thread alone gets torch's threads

    model_path = resolve_model(args.model, args.out)
    base = pe.load_base(model_path, args.device, args.dtype)
    spec = WorkloadSpec(num_requests=args.requests, num_tasks=args.tasks, text_len=args.text_len,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    workload = make_workload(spec, base.geometry, embedding_std(base.model), base.tokenizer)
    if args.no_tasks:
        workload = workload.without_tasks()
    engine = pe.start_engine(base, pe.make_registry(base, workload), args.concurrency[0], args.max_tokens_per_step)
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
    if state["prof"] is not None:
        print(state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        print(f"wrote {trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
