"""The floating-point dtypes promptswap serves and stores prompts in: the one list of their names.

Torch-free at import (settings and `--help` read the names without loading torch); `torch_dtype`
imports torch when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

DtypeName = Literal["float16", "bfloat16", "float32"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
# safetensors header codes of the same dtypes
SAFETENSORS_CODES: dict[str, str] = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
ALLOWED = ", ".join(DTYPE_NAMES[:-1]) + f" or {DTYPE_NAMES[-1]}"  # for messages


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of DTYPE_NAMES; ValueError naming the choices otherwise."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def served_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(torch_dtype(name) for name in DTYPE_NAMES)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
