"""Reading and writing prompt files: promptswap's safetensors format and PEFT adapter directories.

A promptswap prompt file IS a PEFT prompt-learning weights file: one tensor `prompt_embeddings`
(`[n, hidden]` for a prompt, `[n, num_layers*2*kv_dim]` for a prefix) plus string metadata in the
safetensors header. PEFT ignores the metadata, so the file loads into PEFT as
`adapter_model.safetensors` next to the config `peft_adapter_config` describes.

Everything here is about bytes and shapes; what fits a base model is decided in validate.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prompt_store.dtypes import ALLOWED, SAFETENSORS_CODES, dtype_name, torch_dtype
from prompt_store.errors import BodyTooLarge, MalformedFile, MissingTensor, UnsupportedDtype, WrongRank
from prompt_store.geometry import ModelGeometry

TENSOR_NAME = "prompt_embeddings"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
FORMAT_VERSION = "1"
# Temp files of an interrupted atomic write look like this; nothing that loads prompts accepts them.
TEMP_PREFIX = ".promptswap-tmp-"
TEMP_SUFFIX = ".tmp"

# The dtypes a prompt may be stored in (safetensors header code -> torch dtype).
STORED_DTYPES: dict[str, torch.dtype] = {code: torch_dtype(name) for code, name in SAFETENSORS_CODES.items()}
# Byte sizes of the safetensors dtypes, to check a header's offsets before safetensors reads them.
_ITEM_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_CODE_NAMES = {"F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
               "U8": "uint8", "BOOL": "bool", "F16": "float16", "BF16": "bfloat16", "F32": "float32"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class PromptFile:
    """A prompt as read, before it is checked against a base model."""

    embeddings: torch.Tensor = field(repr=False)  # [n, width], float16/bfloat16/float32, as stored
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None  # the PEFT adapter_config.json, when read from a PEFT adapter

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.embeddings.dtype)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's row-major bytes (the identity of a prompt version's weights)."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def parse_header(data: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """Check a safetensors header by hand and return (tensor entries, metadata).

    safetensors itself would reject most damage too, but checking first turns every truncation
    or lie in the header into a MalformedFile that names what is wrong.
    """
    if len(data) < 8:
        raise MalformedFile(
            f"not a safetensors file: expected at least 8 bytes (the header length), got {len(data)}",
            expected=">= 8 bytes", actual=len(data),
        )
    header_len = int.from_bytes(data[:8], "little")
    available = len(data) - 8
    if header_len == 0 or header_len > available:
        raise MalformedFile(
            f"truncated or not a safetensors file: the header length field says {header_len} bytes "
            f"but {available} bytes follow it",
            expected=f"1..{available}", actual=header_len,
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedFile(
            f"the safetensors header is not valid UTF-8 JSON: {exc}", expected="a JSON object", actual="bad JSON"
        ) from None
    if not isinstance(header, dict):
        raise MalformedFile(
            f"the safetensors header must be a JSON object, got {type(header).__name__}",
            expected="object", actual=type(header).__name__,
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MalformedFile(
            "the safetensors __metadata__ must map strings to strings",
            expected="dict[str, str]", actual=type(metadata).__name__,
        )
    body_len = available - header_len
    for name, entry in header.items():
        _check_entry(name, entry, body_len)
    return header, metadata


def peek_metadata(path: Path, max_header: int = 1 << 20) -> dict[str, str]:
    """Best-effort metadata of a file, reading only its header ({} if it cannot be read)."""
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= max_header:
                return {}
            meta = json.loads(f.read(header_len)).get("__metadata__")
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def _check_entry(name: str, entry: object, body_len: int) -> None:
    def bad(what: str) -> MalformedFile:
        return MalformedFile(f"tensor {name!r} in the safetensors header: {what}", actual=repr(entry)[:200])

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    shape, offsets, code = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
    if not isinstance(code, str):
        raise bad("dtype is missing")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative ints, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= body_len
    ):
        raise bad(f"data_offsets must be [begin, end] within the {body_len} data bytes, got {offsets!r}")
    size = _ITEM_SIZE.get(code)
    if size is not None and offsets[1] - offsets[0] != math.prod(shape) * size:
        raise bad(
            f"shape {shape} of {code} needs {math.prod(shape) * size} bytes, "
            f"but data_offsets span {offsets[1] - offsets[0]} (truncated?)"
        )


def check_prompt_tensor(names: list[str], dtype_code: str | None, shape: list[int] | None) -> None:
    """The checks any prompt source must pass: the tensor exists, is 2-D, and is a float we serve."""
    if dtype_code is None or shape is None:
        raise _missing_tensor(names)
    if len(shape) != 2:
        raise WrongRank(
            f"{TENSOR_NAME} must be 2-D [num_virtual_tokens, width], got {len(shape)}-D shape {list(shape)}",
            expected=2, actual=len(shape),
        )
    if dtype_code not in STORED_DTYPES:
        actual = _CODE_NAMES.get(dtype_code, dtype_code)
        raise UnsupportedDtype(
            f"{TENSOR_NAME} must be {ALLOWED}, got {actual}", param="weights", expected=ALLOWED, actual=actual
        )


def _missing_tensor(names: list[str]) -> MissingTensor:
    found = ", ".join(repr(n) for n in sorted(names)[:5]) or "no tensors"
    return MissingTensor(
        f"expected a tensor named {TENSOR_NAME!r}, found {found}", expected=TENSOR_NAME, actual=sorted(names)[:5]
    )


def read_prompt(data: bytes) -> PromptFile:
    """Read promptswap's (or PEFT's) safetensors bytes. Raises a PromptError for any bad input."""
    from safetensors.torch import load

    header, metadata = parse_header(data)
    entry = header.get(TENSOR_NAME)
    check_prompt_tensor(list(header), entry["dtype"] if entry else None, entry["shape"] if entry else None)
    try:
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own error type, KeyError for odd dtypes, ...
        raise MalformedFile(f"safetensors could not read the file: {exc}", actual=str(exc)) from None
    return PromptFile(tensors[TENSOR_NAME], dict(metadata))


def read_legacy_bin(data: bytes) -> PromptFile:
    """Read a legacy PEFT `adapter_model.bin` (a pickled state dict), refusing anything but tensors."""
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # weights_only refuses code; any pickle or zip damage lands here too
        raise MalformedFile(f"adapter_model.bin could not be read: {exc}", actual=str(exc)[:200]) from None
    if not isinstance(state, Mapping):
        raise MalformedFile(
            f"adapter_model.bin must hold a state dict, got {type(state).__name__}",
            expected="dict", actual=type(state).__name__,
        )
    tensor = state.get(TENSOR_NAME)
    if not isinstance(tensor, torch.Tensor):
        raise _missing_tensor([str(k) for k in state])
    code = {v: k for k, v in STORED_DTYPES.items()}.get(tensor.dtype, dtype_name(tensor.dtype))
    check_prompt_tensor([str(k) for k in state], code, list(tensor.shape))
    return PromptFile(tensor, {})


def write_prompt(embeddings: torch.Tensor, metadata: Mapping[str, str]) -> bytes:
    """Serialize one prompt: `prompt_embeddings` plus promptswap's metadata (all strings)."""
    from safetensors.torch import save

    meta = {"format": "pt", "promptswap_format": FORMAT_VERSION}
    meta.update({k: v for k, v in metadata.items() if v is not None})
    tensor = embeddings.detach().cpu().contiguous()
    return save({TENSOR_NAME: tensor}, metadata=meta)


def read_bytes_limited(path: Path, max_bytes: int) -> bytes:
    """Read a file, refusing one over the size limit before reading it."""
    size = path.stat().st_size
    if size > max_bytes:
        raise BodyTooLarge(
            f"{path.name} is {size} bytes, over the limit of {max_bytes} bytes", expected=max_bytes, actual=size
        )
    return path.read_bytes()


def read_path(path: str | Path, *, max_bytes: int) -> PromptFile:
    """Read a PEFT adapter directory or a bare .safetensors / .bin file."""
    path = Path(path)
    if path.is_dir():
        return read_peft_dir(path, max_bytes=max_bytes)
    if not path.is_file():
        raise MalformedFile(f"{path} is neither a file nor a PEFT adapter directory", actual=str(path))
    data = read_bytes_limited(path, max_bytes)
    return read_legacy_bin(data) if path.suffix == ".bin" else read_prompt(data)


def read_peft_dir(path: str | Path, *, max_bytes: int) -> PromptFile:
    """Read a PEFT adapter directory: adapter_config.json plus the weights (safetensors, else legacy .bin)."""
    path = Path(path)
    config_path = path / PEFT_CONFIG_NAME
    if not config_path.is_file():
        raise MalformedFile(
            f"{path} is not a PEFT adapter directory: expected {PEFT_CONFIG_NAME} in it",
            param="config", expected=PEFT_CONFIG_NAME, actual=sorted(p.name for p in path.iterdir())[:10],
        )
    config = load_config(read_bytes_limited(config_path, max_bytes))
    if (path / PEFT_WEIGHTS_NAME).is_file():
        prompt = read_prompt(read_bytes_limited(path / PEFT_WEIGHTS_NAME, max_bytes))
    elif (path / PEFT_LEGACY_WEIGHTS_NAME).is_file():
        prompt = read_legacy_bin(read_bytes_limited(path / PEFT_LEGACY_WEIGHTS_NAME, max_bytes))
    else:
        raise MalformedFile(
            f"{path} has no weights: expected {PEFT_WEIGHTS_NAME} or {PEFT_LEGACY_WEIGHTS_NAME}",
            expected=PEFT_WEIGHTS_NAME, actual=sorted(p.name for p in path.iterdir())[:10],
        )
    return PromptFile(prompt.embeddings, prompt.metadata, config)


def load_config(config: Mapping | bytes | str) -> dict:
    """A PEFT adapter_config.json as a dict, from a dict or raw JSON."""
    if isinstance(config, Mapping):
        return dict(config)
    try:
        parsed = json.loads(config)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedFile(
            f"the PEFT config is not valid JSON: {exc}", param="config", expected="a JSON object", actual="bad JSON"
        ) from None
    if not isinstance(parsed, dict):
        raise MalformedFile(
            f"the PEFT config must be a JSON object, got {type(parsed).__name__}",
            param="config", expected="object", actual=type(parsed).__name__,
        )
    return parsed


def peft_adapter_config(
    kind: str, num_virtual_tokens: int, geometry: ModelGeometry, base_model: str | None = None
) -> dict:
    """The adapter_config.json under which PEFT loads a promptswap file as `adapter_model.safetensors`."""
    common = {
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": geometry.num_layers,
        "base_model_name_or_path": base_model or geometry.model_name,
        "inference_mode": True,
    }
    if kind == "prefix":
        # PEFT stores prefixes per key/value head (GQA), so token_dim is kv_dim, not hidden_size.
        return {
            "peft_type": "PREFIX_TUNING", **common, "token_dim": geometry.kv_dim,
            "num_attention_heads": geometry.num_kv_heads, "prefix_projection": False,
        }  # fmt: skip
    return {"peft_type": "PROMPT_TUNING", **common, "token_dim": geometry.hidden_size}


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
