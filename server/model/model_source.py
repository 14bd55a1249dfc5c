"""What to load for a configured model: the demo's directory, a converted GGUF's, or the model as given.
`serve` and `train` resolve `--model` the same way, so a task trained on the demo fits the demo served."""

from __future__ import annotations

import logging

from server.config import Settings
from server.model.gguf import converted_dir

log = logging.getLogger("promptswap")


def model_source(settings: Settings) -> str:
    """What to load: the demo's directory, a converted GGUF's, or the configured model as given."""
    demo = settings.offline_demo()
    if demo is not None:
        demo.announce(log, settings.model_name())
        return str(demo.ensure(settings.cache_dir))
    gguf = settings.gguf_path()
    if gguf is not None:
        return str(converted_dir(gguf, settings.cache_dir))
    assert settings.model is not None  # not a demo
    return settings.model
