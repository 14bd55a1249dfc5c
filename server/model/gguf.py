"""GGUF checkpoints, dequantized once into an ordinary Hugging Face model directory, cached by content.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=...)`) by dequantizing every tensor,
which takes tens of seconds; its `save_pretrained` refuses a model loaded that way. So the first
load writes the dequantized weights (safetensors), the config and the tokenizer into
`<cache>/models/<file stem>-<sha256 prefix>/`, and every later start loads that directory in a
fraction of a second. The digest is of the file's bytes: a changed file is converted anew, a moved
or renamed one is not.

The directory also names the file it came from (`gguf_source`), so that `--quantize gguf` can serve the file's
own Q4_1 blocks (`q4_1_weights`) instead of their float32 copies.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.model.build_once import build_once

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "gguf_source"  # in a converted directory: the GGUF file's path, one line
Q4_1_BLOCK = 32  # weights a Q4_1 block: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes; w = d * q + m


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(GGUF_SUFFIX)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """The model directory for `gguf_path`, converting it on first use (safe against a second process)."""
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist or is not a file")
    target = Path(cache_dir) / "models" / f"{path.stem}-{file_digest(path)[:16]}"

    def convert(out: Path) -> None:
        log.info("converting %s (dequantizing GGUF, once) into %s", path, target)
        _convert(path, out)

    target = build_once(target, convert)
    source = target / SOURCE_FILE
    if not source.is_file() or source.read_text().strip() != str(path.resolve()):  # converted before, or moved
        tmp = target / f".{SOURCE_FILE}.{os.getpid()}"
        try:
            tmp.write_text(f"{path.resolve()}\n")
            os.replace(tmp, source)
        except OSError as exc:  # a read-only cache serves as it is; only --quantize gguf needs the name
            log.info("cannot record %s as the source of %s (%s); --quantize gguf will not find it", path, target,
                     exc)
    return target


def source_of(model_dir: str | Path) -> Path | None:
    """The GGUF file `model_dir` was converted from, None when it was not (or the file is gone)."""
    source = Path(model_dir) / SOURCE_FILE
    if not source.is_file():
        return None
    path = Path(source.read_text().strip())
    return path if path.is_file() else None


@dataclass(frozen=True)
class Q41Weight:
    """A Q4_1 matrix as stored, in the Hugging Face model's row order: weight[r, c] = d[r, c // 32] * q[r, c] + m[r,
    c // 32], computed in float32 from fp16 d and m (as gguf's and llama.cpp's dequantization do)."""

    codes: torch.Tensor  # [out, in] uint8, 0..15
    d: torch.Tensor  # [out, in / 32] float32 (fp16 values)
    m: torch.Tensor  # [out, in / 32] float32 (fp16 values)

    def dequantized(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        blocks = self.codes.view(rows, cols // Q4_1_BLOCK, Q4_1_BLOCK).float()
        return (self.d[..., None] * blocks + self.m[..., None]).view(rows, cols)


def q4_1_weights(gguf_path: str | Path, model: torch.nn.Module) -> dict[str, Q41Weight]:
    """The file's Q4_1 matrices by the name of `model`'s module they load into ("model.layers.0.mlp.up_proj"),
    their rows put in the model's order the way transformers' loader puts them (a Llama's q and k rows are
    permuted in the file). Other tensor types are not returned."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = GGUFReader(str(gguf_path))
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)  # gguf tensor name -> the model's parameter name
    out = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        raw = np.asarray(tensor.data)  # [out, in / 32 * 20] uint8
        raw = processor.process(weights=raw, name=tensor.name, tensor_key_mapping=names, parsed_parameters={}).weights
        key = names.get(tensor.name)
        if key is None:
            continue
        rows = raw.shape[0]
        blocks = np.ascontiguousarray(raw).reshape(rows, -1, 20)  # [out, in / 32, 20]
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., 4:]  # [out, groups, 16]: byte j holds weight j (low nibble) and j + 16 (high)
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
        out[key.removesuffix(".weight")] = Q41Weight(torch.from_numpy(codes), torch.from_numpy(d),
                                                     torch.from_numpy(m))
    return out


def _convert(path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights written below are plain float32
        del config.quantization_config
    config.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    save_model(model, str(out / "model.safetensors"))
    (out / SOURCE_FILE).write_text(f"{path.resolve()}\n")  # tied weights (lm_head = embeddings) stored once
