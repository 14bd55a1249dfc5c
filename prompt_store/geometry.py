"""The shape facts of a base model that decide which prompts fit it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# A soft prompt (virtual-token embeddings, hidden_size wide) or a prefix (keys and values of every layer).
Kind = Literal["prompt", "prefix"]
KINDS: tuple[Kind, ...] = ("prompt", "prefix")


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    """What a prompt's width is checked against.

    A soft prompt is `[n, hidden_size]`; a prefix is `[n, num_layers * 2 * kv_dim]` where
    `kv_dim = num_kv_heads * head_dim` (PEFT writes prefixes per key/value head under GQA).
    """

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelGeometry.{name} must be a positive int, got {value!r}")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def prefix_width(self) -> int:
        return self.num_layers * 2 * self.kv_dim

    def width_for(self, kind: str) -> int:
        return self.hidden_size if kind == "prompt" else self.prefix_width

    def split_prefix(self, table: Any) -> tuple[Any, Any]:
        """PEFT's prefix layout, the one place it is written: a `[n, layers*2*kv_dim]` tensor becomes
        (keys, values), each a `[layers, kv_heads, n, head_dim]` view. Row 2l of the `2*layers` axis
        is layer l's keys, row 2l+1 its values (stored as trained: no rotary applied)."""
        n = table.shape[0]
        kv = table.view(n, 2 * self.num_layers, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0::2], kv[1::2]

    def join_prefix(self, keys: Any, values: Any) -> Any:
        """The inverse of `split_prefix`: (keys, values) `[layers, kv_heads, n, head_dim]` -> `[n, layers*2*kv_dim]`."""
        n = keys.shape[2]
        kv = keys.new_empty(2 * self.num_layers, self.num_kv_heads, n, self.head_dim)
        kv[0::2], kv[1::2] = keys, values
        return kv.permute(2, 0, 1, 3).reshape(n, self.prefix_width)

    @classmethod
    def from_config(cls, config, model_name: str | None = None) -> ModelGeometry:
        """Read the geometry from a transformers config (any decoder-only architecture)."""
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = _first_attr(text_config, "hidden_size", "n_embd", "d_model")
        layers = _first_attr(text_config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first_attr(text_config, "num_attention_heads", "n_head", "num_heads")
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or hidden // heads
        name = model_name or getattr(config, "name_or_path", None) or None
        return cls(hidden, layers, kv_heads, head_dim, name)


def _first_attr(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"model config has none of {names}: cannot tell its geometry")
