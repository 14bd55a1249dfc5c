"""The prepared GPU check: one run, nothing to download, to be run whenever a GPU is lent.

    python -m benchmarks.gpu_check                      # CUDA when there is one; ~0.5B and ~1.5B shapes
    python -m benchmarks.gpu_check --device cpu --quick # the same code on tiny shapes (the test suite runs it)

It needs only torch, transformers, peft, safetensors and tokenizers (no HTTP stack, no llguidance): run it from
the repository root, or install promptswap with `--no-deps` beside the machine's own torch.

1. Fidelity on the device: models of Qwen2.5-0.5B's and -1.5B's shapes with random weights (the local
   tokenizer; the model keeps its real vocabulary), one PEFT adapter of each kind (prompt tuning, P-tuning,
   prefix tuning) with random weights, a mixed batch of requests of every task and the base model alone,
   greedy. Each request's tokens are compared with a greedy loop over PeftModel.forward on that request alone,
   on the same device, in float32 with TF32 off. Random weights give near-ties that a different summation
   order may flip, so it prints two counts: tokens equal, and equal up to the first near-tie (where the
   reference's two best logits are within 1e-3: the divergence is then summation order, not meaning).
2. Throughput on the device, in the served dtype (bfloat16 on CUDA): the engine's generated tokens per second
   at concurrency 1, 16 and 64, and the wall time per decode step.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NEAR_TIE = 1e-3
# Qwen2.5's shapes: hidden, layers, heads, kv heads, MLP width; the vocabulary is its own (151,936).
SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024),
}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "one", "frozen", "model",
         "serves", "many", "tasks", "at", "once", "with", "soft", "prompts", "and", "prefixes", "in", "every", "batch"]


@dataclass
class Fidelity:
    shape: str
    requests: int
    equal: int
    equal_to_first_tie: int


def build_model(root: Path, shape: str) -> Path:
    from transformers import Qwen2Config

    from server.demo.tiny_models import build_model_from_config

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_theta=1_000_000.0)
    return build_model_from_config(root / f"qwen2-{shape}", config)


def build_adapters(model_dir: Path, root: Path, device) -> dict[str, Path]:
    import torch
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    configs = {"prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8),
               "ptuning": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5,
                                              encoder_hidden_size=64),
               "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16)}
    out = {}
    for i, (task, config) in enumerate(configs.items()):
        torch.manual_seed(100 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), copy.deepcopy(config))
        model.save_pretrained(str(root / task))
        out[task] = root / task
    return out


def reference_greedy(model, ids: list[int], steps: int, device) -> tuple[list[int], list[float]]:
    """PEFT's greedy tokens for one request alone, and the gap between the two best logits at each step."""
    import torch

    out, gaps = [], []
    with torch.inference_mode():
        for _ in range(steps):
            x = torch.tensor([ids + out], device=device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
            best = torch.topk(logits, 2).values
            gaps.append(float(best[0] - best[1]))
            out.append(int(logits.argmax()))
    return out, gaps


def check_fidelity(shape: str, root: Path, device: str, requests: int, steps: int) -> Fidelity:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prompt_store import ModelGeometry, PromptRegistry
    from server.engine.admission import EngineRequest
    from server.engine.config import EngineConfig
    from server.engine.loop import Engine
    from server.engine.sequence import SamplingParams
    from server.model.model_loader import load_base_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model_dir = build_model(root, shape)
    adapters = build_adapters(model_dir, root / f"adapters-{shape}", device)
    base = load_base_model(model_dir, device=device, dtype="float32")
    registry = PromptRegistry(ModelGeometry.from_config(base.model.config), root / f"prompts-{shape}",
                              dtype=base.dtype)
    for task, path in adapters.items():
        registry.put_path(task, path)
    rng = random.Random(0)
    batch = [(rng.choice([*adapters, None]), " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))))
             for _ in range(requests)]
    engine = Engine(base, registry, EngineConfig(max_running=max(requests, 1)))
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=steps, ignore_eos=True)
        handles = [engine.submit(EngineRequest(text, task=task, params=params)) for task, text in batch]
        got = [list(h.result(timeout=600).token_ids) for h in handles]
    finally:
        engine.shutdown(timeout_s=5)
    del base
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    references = {None: plain}
    equal = to_tie = 0
    for (task, text), tokens in zip(batch, got, strict=True):
        if task not in references:
            references[task] = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), str(adapters[task])
            ).to(device).eval()
        ids = list(engine.tokenizer(text)["input_ids"])
        want, gaps = reference_greedy(references[task], ids, steps, device)
        equal += tokens == want
        first_diff = next((i for i, (a, b) in enumerate(zip(tokens, want, strict=True)) if a != b), None)
        to_tie += first_diff is None or gaps[first_diff] < NEAR_TIE
    return Fidelity(shape, len(batch), equal, to_tie)


def throughput(shape: str, root: Path, device: str, concurrencies: list[int], new_tokens: int) -> list[dict]:
    from server.engine.admission import EngineRequest
    from server.engine.config import EngineConfig
    from server.engine.loop import Engine
    from server.engine.sequence import SamplingParams
    from server.model.model_loader import load_base_model

    model_dir = root / f"qwen2-{shape}"
    if not model_dir.exists():
        build_model(root, shape)
    base = load_base_model(model_dir, device=device)  # the served dtype: bfloat16 on CUDA
    rows = []
    from prompt_store import ModelGeometry, PromptRegistry

    registry = PromptRegistry(ModelGeometry.from_config(base.model.config), root / f"tp-prompts-{shape}",
                              dtype=base.dtype)
    for c in concurrencies:
        engine = Engine(base, registry, EngineConfig(max_running=c))
        engine.start()
        try:
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            text = " ".join(WORDS[:24])
            engine.submit(EngineRequest(text, params=SamplingParams(max_new_tokens=4))).result(timeout=600)  # warm
            steps_before = engine.steps
            start = time.perf_counter()
            handles = [engine.submit(EngineRequest(f"{i} {text}", params=params)) for i in range(c)]
            tokens = sum(len(h.result(timeout=600).token_ids) for h in handles)
            wall = time.perf_counter() - start
            steps = engine.steps - steps_before
        finally:
            engine.shutdown(timeout_s=5)
        rows.append({"shape": shape, "dtype": str(base.dtype).removeprefix("torch."), "concurrency": c,
                     "tok_s": tokens / wall, "ms_per_step": 1000 * wall / max(steps, 1), "steps": steps})
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="0.5b,1.5b", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few requests: the code path, not a result")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--concurrency", default="1,16,64")
    args = p.parse_args(argv)
    shapes = ["tiny"] if args.quick else args.shapes.split(",")
    concurrency = [1, 4] if args.quick else [int(c) for c in args.concurrency.split(",")]
    requests = 6 if args.quick else args.requests
    import peft
    import transformers

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}); torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="promptswap-gpu-check-") as tmp:
        root = Path(tmp)
        print("\nfidelity: greedy tokens against PEFT's forward, each request alone (float32, TF32 off)")
        print(f"{'shape':<8}{'requests':>9}{'equal':>7}{'equal to first near-tie':>25}")
        for shape in shapes:
            t0 = time.perf_counter()
            f = check_fidelity(shape, root, args.device, requests, args.steps)
            ok &= f.equal_to_first_tie == f.requests
            print(f"{f.shape:<8}{f.requests:>9}{f.equal:>7}{f.equal_to_first_tie:>25}   "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        print("\nthroughput: generated tokens per second (served dtype), one text per request, no task")
        print(f"{'shape':<8}{'dtype':<10}{'c':>4}{'tok/s':>10}{'ms/step':>10}{'steps':>7}")
        for shape in shapes:
            for row in throughput(shape, root, args.device, concurrency, args.steps * 4):
                print(f"{row['shape']:<8}{row['dtype']:<10}{row['concurrency']:>4}{row['tok_s']:>10.1f}"
                      f"{row['ms_per_step']:>10.2f}{row['steps']:>7}", flush=True)
    print("\nfidelity", "PASSED" if ok else "FAILED: a request diverged from PEFT before any near-tie")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
