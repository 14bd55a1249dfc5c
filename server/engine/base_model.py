"""The base model as the engine serves it: the frozen model, its tokenizer and geometry, where it computes.
server/model/ loads one; the engine only reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prompt_store.geometry import ModelGeometry


@dataclass(frozen=True)
class BaseModel:
    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer
    geometry: ModelGeometry
    name: str
    device: torch.device  # where inputs go: the input embeddings' device
    dtype: torch.dtype
    max_context: int
    layer_devices: tuple[torch.device, ...] = ()  # where each decoder layer computes (empty: all on `device`)
    quantize: str = "none"  # server/model/quantize.py: how its Linear weights are stored

    def devices_of_layers(self) -> list[torch.device]:
        return list(self.layer_devices) or [self.device] * self.geometry.num_layers
