"""What scoring choices costs next to generating: `python -m benchmarks.choices`.

One engine in this process, one task (a 16-token soft prompt), the same review texts: each round times
scoring 8 choices of a text against generating 8 tokens for the same text (greedy, EOS ignored), one
request at a time, alternating, so both see the same machine. Prints the medians and their ratio and
writes benchmarks/results/choices.json. The target: scoring 8 choices costs under 2x one 8-token
generation (the text is computed once; the choices' tokens go through one more pass together).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "choices.json"
CHOICES = ["thumbs up", "thumbs down", "positive", "negative", "neutral", "mixed feelings", "excellent", "terrible"]
TEXTS = [f"Review: {t}\nVerdict:" for t in (
    "The film was wonderful and the acting superb.", "A dull plot that dragged on far too long.",
    "I laughed all evening; the script is clever.", "Badly written, flat, and a waste of a great cast.",
    "Moving and beautifully shot, worth seeing twice.", "Stale and predictable from start to finish.")]


def measure(model_path: str, rounds: int, threads: int | None = None) -> dict:
    import torch

    from prompt_store import PromptRegistry
    from prompt_store.format import write_prompt
    from server.engine.admission import EngineRequest
    from server.engine.config import EngineConfig
    from server.engine.loop import Engine
    from server.engine.sequence import SamplingParams
    from server.model.model_loader import load_base_model

    base = load_base_model(model_path)
    registry = PromptRegistry(base.geometry, dtype=base.dtype)
    gen = torch.Generator().manual_seed(0)
    registry.put("reviews", write_prompt(torch.randn(16, base.geometry.hidden_size, generator=gen) * 0.02,
                                         {"kind": "prompt"}))
    engine = Engine(base, registry, EngineConfig(threads=threads))
    engine.start()
    eight = SamplingParams(max_new_tokens=8, ignore_eos=True)
    try:
        for text in TEXTS[:2]:  # warm up: the prefix is computed and cached, allocations made
            engine.submit(EngineRequest(text, task="reviews", choices=CHOICES)).result(timeout=600)
            engine.submit(EngineRequest(text, task="reviews", params=eight)).result(timeout=600)
        score_s, generate_s = [], []
        for i in range(rounds):
            text = TEXTS[i % len(TEXTS)]
            start = time.perf_counter()
            engine.submit(EngineRequest(text, task="reviews", choices=CHOICES)).result(timeout=600)
            score_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.submit(EngineRequest(text, task="reviews", params=eight)).result(timeout=600)
            generate_s.append(time.perf_counter() - start)
    finally:
        engine.shutdown(timeout_s=10)
    ratio = statistics.median(score_s) / statistics.median(generate_s)
    return {"model": Path(model_path).name, "rounds": rounds, "choices": len(CHOICES),
            "score_8_choices_median_s": round(statistics.median(score_s), 4),
            "generate_8_tokens_median_s": round(statistics.median(generate_s), 4),
            "ratio": round(ratio, 3), "target": "< 2", "met": ratio < 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory (default: the demo model, as `promptswap serve`)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from server.config import Settings
    from server.model.model_source import model_source

    result = measure(model_source(Settings(model=args.model)), args.rounds, args.threads)
    print(f"model {result['model']}, {result['rounds']} rounds, one request at a time")
    print(f"  score {result['choices']} choices: {result['score_8_choices_median_s'] * 1000:.1f} ms (median)")
    print(f"  generate 8 tokens:  {result['generate_8_tokens_median_s'] * 1000:.1f} ms (median)")
    print(f"  ratio {result['ratio']:.2f}x (target < 2): {'met' if result['met'] else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
