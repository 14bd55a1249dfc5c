"""Opt-in weight quantization of the base model (`--quantize`), never the default.

`int8-weight-only`: torchao's `Int8WeightOnlyConfig` (per output channel, symmetric) on the decoder's
`nn.Linear` layers once the model has loaded; activations, the KV cache and the soft prompts and prefixes
stay in the model's dtype (`--dtype`). The input embeddings, which a soft prompt's virtual tokens are
concatenated with, are no Linear and stay as they are; so does an output head tied to them: quantizing
it too gives it a second, int8 copy of the embedding table, and on SmolLM2 that measured slower, further
from float32's tokens and larger (docs/performance.md, "Faster on CPU"). An untied head is quantized with the rest.

Greedy tokens differ from float32's for some requests: benchmarks/precision.py measures how many, and
whether it is faster at all on this machine (docs/performance.md, "Faster on CPU").

Torch-free at import: the settings read the names without loading torch.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Literal, get_args

from server.engine.errors import ModelNotSupported

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

QuantizeName = Literal["none", "int8-weight-only"]
QUANTIZE_NAMES: tuple[str, ...] = get_args(QuantizeName)
LIBRARY = "torchao"
INSTALL_HINT = 'pip install "promptswap[quantize]" (torchao)'


class QuantizerMissing(ValueError):
    """--quantize names a method whose library is not installed."""

    def __init__(self, method: str) -> None:
        super().__init__(f"--quantize {method} needs {LIBRARY}, which is not installed; install it: {INSTALL_HINT}")


def check_method(method: str | None) -> str:
    """The method's name (None: "none"); ValueError naming the choices for an unknown one."""
    method = "none" if method in (None, "") else method
    if method not in QUANTIZE_NAMES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_NAMES)}, got {method!r}")
    return method


def available(method: str) -> bool:
    """Whether `method`'s library is installed (without importing it)."""
    return check_method(method) == "none" or importlib.util.find_spec(LIBRARY) is not None


def quantize_model(model: torch.nn.Module, method: str | None) -> int:
    """Quantize `model`'s Linear weights in place by `method`; returns how many layers were quantized.

    QuantizerMissing when the method's library is not installed; ModelNotSupported when the model has no
    Linear layer it would quantize."""
    method = check_method(method)
    if method == "none":
        return 0
    if not available(method):
        raise QuantizerMissing(method)
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # its import noise: server/process/logs.py

    tied = _tied_output_head(model)
    chosen: list[str] = []

    def linear_not_tied(module: torch.nn.Module, name: str) -> bool:
        if isinstance(module, torch.nn.Linear) and module is not tied:
            chosen.append(name)
            return True
        return False

    # set_inductor_config=False: nothing is compiled here, and torchao would otherwise change inductor's
    # process-wide settings.
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=linear_not_tied)
    if not chosen:  # GPT-2's layers, for one, are transformers' Conv1D
        raise ModelNotSupported(f"--quantize {method} found no torch.nn.Linear layer to quantize in this "
                                f"{type(model).__name__}; serve it without --quantize")
    log.info("quantized %d Linear layers to int8 weights (%s %s)%s", len(chosen), LIBRARY, _version(),
             "; the output head is tied to the input embeddings and stays as it is" if tied is not None else "")
    return len(chosen)


def _tied_output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output head when it shares its weight with the input embeddings, else None."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return None
    head, embeddings = get_out(), get_in()
    if head is None or embeddings is None:
        return None
    same = getattr(head, "weight", None) is getattr(embeddings, "weight", object())
    return head if same else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(LIBRARY)
    except PackageNotFoundError:
        return "(version unknown)"

