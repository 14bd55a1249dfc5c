"""`python -m benchmarks.run --workload soak`: the server's resident memory under a long, steady, varied load.

    python -m benchmarks.run --workload soak                            # 20,000 requests, ~10 min on 2 cores
    python -m benchmarks.run --workload soak --cpu-linear torch         # the same on torch's own Linear kernels
    python -m benchmarks.run --workload soak --requests 2000            # a quick look

`--concurrency` clients (one value, default 6) each send a request as soon as their last one ended, through the
engine's public API in this process, until `--requests` have been answered, after `--warmup-requests` more that
are not measured. Each request draws, from the seed and its number: a task of `--tasks` (soft prompts and
prefixes, alternately, `--virtual-tokens` each) or none (`--no-task-fraction`), a text of random vocabulary of
`--text-len` tokens, `--max-new-tokens`, greedy or sampled (temperature 0.8, seeded), one sample or two
(`Engine.submit_samples`), token log-probabilities or not, and whether it is read as a stream (30%) or waited for
whole in a worker thread, like the HTTP service's two paths. So every step has another count of tokens.

The process's resident memory (/proc/self/statm) is read every `POLL_S` and at each quarter of the measured
requests: printed per quarter (its smallest, median, largest and last reading), with the memory at rest (model
loaded, engine started, no request yet; and again once idle after the run). The target: the last quarter's
largest reading within 5% of the first quarter's. The KV pool gets a budget of its own (`--kv-cache-bytes`, 64 MiB
here) so that what the pool and the prefix cache may keep is reached during the warm-up; the default model is a
tiny random-weight Llama (`--model tiny-llama-random`), where the model itself is small and any growth shows.
Writes `<out>/soak.json` and `<out>/soak.png` (memory against requests answered).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.workload import Task, Workload, WorkloadSpec, embedding_std, make_tasks, plain_vocab

DEFAULTS = {"requests": 20_000, "tasks": 5, "no_task_fraction": 0.2, "virtual_tokens": (2, 16), "text_len": (1, 48),
            "max_new_tokens": (1, 16), "arrival": "burst", "concurrency": [6], "model": "tiny-llama-random",
            "kv_cache_bytes": 64 * 2**20}
POLL_S = 0.25  # how often the sampler reads the resident memory
QUARTERS = 4
TOLERANCE = 0.05  # the last quarter's largest reading over the first quarter's, at most 1 + this
STREAMED, SAMPLED, TWO_SAMPLES, LOGPROBS = 0.3, 0.5, 0.1, 0.1  # shares of the requests


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class SoakRequest:
    index: int
    task: str | None
    text: str
    max_new_tokens: int
    sampled: bool
    samples: int
    logprobs: bool
    streamed: bool


def draw_request(index: int, spec: WorkloadSpec, tasks: list[str], vocab: list[int], tokenizer) -> SoakRequest:
    """Request number `index`: a pure function of the seed and the number, drawn when a client needs it."""
    rng = random.Random(spec.seed * 1_000_003 + index)
    task = None if not tasks or rng.random() < spec.no_task_fraction else rng.choice(tasks)
    text = tokenizer.decode(rng.choices(vocab, k=rng.randint(*spec.text_len)))
    return SoakRequest(index, task, text, rng.randint(*spec.max_new_tokens), sampled=rng.random() < SAMPLED,
                       samples=2 if rng.random() < TWO_SAMPLES else 1, logprobs=rng.random() < LOGPROBS,
                       streamed=rng.random() < STREAMED)


@dataclass
class Sampler:
    """Reads the resident memory every POLL_S from a thread of its own, with the requests answered then."""

    answered: Callable[[], int]
    readings: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, requests answered, bytes)
    _done: threading.Event = field(default_factory=threading.Event)
    _t0: float = field(default_factory=time.perf_counter)

    def read(self) -> None:
        self.readings.append((time.perf_counter() - self._t0, self.answered(), rss_bytes()))

    def _poll(self) -> None:
        while not self._done.wait(POLL_S):
            self.read()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._poll, name="soak-rss", daemon=True)
        self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.read()


class Clients:
    """`clients` closed-loop clients over one engine; counts what they were answered."""

    def __init__(self, engine, spec: WorkloadSpec, tasks: list[str], tokenizer, clients: int) -> None:
        self.engine, self.spec, self.tasks, self.tokenizer, self.clients = engine, spec, tasks, tokenizer, clients
        self.vocab = plain_vocab(tokenizer)
        self.answered = 0
        self.tokens = 0
        self.finished_at: list[float] = []  # perf_counter at each answer of the measured run, in order

    async def _one(self, r: SoakRequest) -> int:
        from server.engine.admission import EngineRequest
        from server.engine.results import Completion
        from server.engine.sequence import SamplingParams

        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0.8 if r.sampled else 0.0,
                                seed=r.index if r.sampled else None, logprobs=1 if r.logprobs else None)
        request = EngineRequest(r.text, task=r.task, params=params, n=r.samples)
        handles = (self.engine.submit_samples(request) if r.samples > 1 else [self.engine.submit(request)])
        tokens = 0
        for handle in handles:
            if r.streamed:
                async for item in handle.stream():
                    if isinstance(item, Completion):
                        tokens += len(item.token_ids)
            else:
                tokens += len((await asyncio.to_thread(handle.result)).token_ids)
        return tokens

    async def _client(self, numbers, record: bool) -> None:
        for index in numbers:
            tokens = await self._one(draw_request(index, self.spec, self.tasks, self.vocab, self.tokenizer))
            self.answered += 1
            self.tokens += tokens
            if record:
                self.finished_at.append(time.perf_counter())

    def run(self, first: int, count: int, record: bool) -> None:
        """Requests `first` .. `first + count - 1`, taken in turn by the clients."""
        async def main() -> None:
            numbers = iter(range(first, first + count))
            await asyncio.gather(*(self._client(numbers, record) for _ in range(self.clients)))

        asyncio.run(main())


def quarters(readings: list[tuple[float, int, int]], starts: list[float], requests: int) -> list[dict]:
    """Per quarter of the measured requests: its requests, time, rate and resident memory readings (MiB)."""
    rows = []
    bounds = [round(requests * q / QUARTERS) for q in range(QUARTERS + 1)]
    for q in range(QUARTERS):
        lo, hi = bounds[q], bounds[q + 1]
        mine = [b for _, n, b in readings if lo <= n <= hi] or [readings[-1][2]]
        seconds = starts[hi] - starts[lo]
        rows.append({"quarter": q + 1, "requests": hi - lo, "seconds": seconds,
                     "requests_per_s": (hi - lo) / seconds if seconds > 0 else float("nan"),
                     "rss_min_mib": min(mine) / 2**20, "rss_median_mib": statistics.median(mine) / 2**20,
                     "rss_max_mib": max(mine) / 2**20, "rss_end_mib": mine[-1] / 2**20, "readings": len(mine)})
    return rows


def run(args: argparse.Namespace, model_path: str, log: Callable[[str], None]) -> dict:
    """The soak: print its table and target, draw its plot; returns the JSON payload."""
    import gc

    from benchmarks import promptswap_engine as pe
    from benchmarks.run import spec_from
    from benchmarks.threads import engine_threads
    from server.engine.config import EngineConfig
    from server.engine.loop import Engine
    from server.model.model_loader import load_base_model

    start = time.perf_counter()
    spec = spec_from(args)
    clients = args.concurrency[0]
    base = load_base_model(model_path, device=args.device, dtype=args.dtype,
                           onednn_linears=args.cpu_linear == "onednn")
    tasks: dict[str, Task] = make_tasks(spec, base.geometry, embedding_std(base.model))
    registry = pe.make_registry(base, Workload(tasks, ()))
    settings = {"kv_cache_bytes": args.kv_cache_bytes, "prefix_caching": not args.no_prefix_caching}
    config = EngineConfig(max_running=args.max_running, max_tokens_per_step=args.max_tokens_per_step,
                          threads=engine_threads(), **settings)
    engine = Engine(base, registry, config)
    engine.start()
    try:
        gc.collect()
        at_rest = rss_bytes()
        load = Clients(engine, spec, list(tasks), base.tokenizer, clients)
        log(f"soak: at rest {at_rest / 2**20:.1f} MiB; {args.warmup_requests:,} warm-up requests")
        load.run(spec.num_requests, args.warmup_requests, record=False)  # numbers after the measured ones
        warm = rss_bytes()
        load.answered = load.tokens = 0
        log(f"soak: warm {warm / 2**20:.1f} MiB; {spec.num_requests:,} measured requests, {clients} clients")
        t0 = time.perf_counter()
        with Sampler(lambda: load.answered) as sampler:
            load.run(0, spec.num_requests, record=True)
        wall = time.perf_counter() - t0
        tokens = load.tokens
        time.sleep(args.idle_s)  # the engine hands its pages back once idle
        gc.collect()
        idle = rss_bytes()
        stats = asdict(engine.stats())
    finally:
        engine.shutdown(timeout_s=5.0)
    rows = quarters(sampler.readings, [t0, *load.finished_at], spec.num_requests)
    first, last = rows[0]["rss_max_mib"], rows[-1]["rss_max_mib"]
    growth = last / first - 1
    met = abs(growth) <= TOLERANCE
    title = (f"{spec.num_requests:,} requests, {clients} clients, {len(tasks)} tasks, texts of "
             f"{spec.text_len[0]}-{spec.text_len[1]} tokens, {spec.max_new_tokens[0]}-{spec.max_new_tokens[1]} new, "
             f"--cpu-linear {args.cpu_linear}, prefix caching {'off' if args.no_prefix_caching else 'on'}")
    print(f"\n== soak: {title} ==")
    print("| quarter | requests | s | req/s | RSS MiB min | median | max | end |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['quarter']} | {r['requests']:,} | {r['seconds']:.1f} | {r['requests_per_s']:.1f} | "
              f"{r['rss_min_mib']:.1f} | {r['rss_median_mib']:.1f} | {r['rss_max_mib']:.1f} | {r['rss_end_mib']:.1f} |")
    print(f"  at rest (model loaded, no request yet): {at_rest / 2**20:.1f} MiB")
    print(f"  after {args.warmup_requests:,} warm-up requests: {warm / 2**20:.1f} MiB")
    print(f"  at rest after the run ({args.idle_s:g} s idle): {idle / 2**20:.1f} MiB")
    print(f"  {spec.num_requests:,} requests in {wall:.1f} s: {spec.num_requests / wall:.1f} req/s, "
          f"{tokens / wall:.1f} generated tokens/s")
    print(f"  target the last quarter's largest RSS within {TOLERANCE:.0%} of the first's: "
          f"{'met' if met else 'NOT MET'} ({growth:+.1%})")
    plot = args.out / "soak.png"
    _plot(plot, sampler.readings, f"{Path(model_path).name}: {title}")
    print(f"wrote {plot}")
    return {
        "workload": "soak",
        "spec": asdict(spec),
        "settings": {"clients": clients, "max_running": args.max_running,
                     "max_tokens_per_step": args.max_tokens_per_step, "cpu_linear": args.cpu_linear,
                     "warmup_requests": args.warmup_requests, "poll_s": POLL_S, "idle_s": args.idle_s,
                     "shares": {"streamed": STREAMED, "sampled": SAMPLED, "two_samples": TWO_SAMPLES,
                                "logprobs": LOGPROBS}, **settings,
                     "onednn_cache_capacity": {k: os.environ.get(k) for k in
                                               ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}},
        "tasks": {t.name: {"kind": t.kind, "num_virtual": t.num_virtual} for t in tasks.values()},
        "rss_mib": {"at_rest": at_rest / 2**20, "warm": warm / 2**20, "idle_after": idle / 2**20},
        "quarters": rows,
        "requests_per_s": spec.num_requests / wall, "tokens_per_s": tokens / wall, "generated_tokens": tokens,
        "target": {"what": f"last quarter's largest RSS within {TOLERANCE:.0%} of the first quarter's",
                   "measured": growth, "target": TOLERANCE, "met": met},
        "engine": stats,
        "readings": [{"s": s, "answered": n, "rss_mib": b / 2**20} for s, n, b in sampler.readings],
        "total_s": time.perf_counter() - start,
    }


def _plot(path: Path, readings: list[tuple[float, int, int]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([n for _, n, _ in readings], [b / 2**20 for _, _, b in readings], lw=1)
    ax.set_xlabel("requests answered")
    ax.set_ylabel("resident memory, MiB")
    ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

