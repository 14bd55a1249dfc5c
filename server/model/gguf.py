"""GGUF checkpoints, dequantized once into an ordinary Hugging Face model directory, cached by content.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=...)`) by dequantizing every tensor,
which takes tens of seconds; its `save_pretrained` refuses a model loaded that way. So the first
load writes the dequantized weights (safetensors), the config and the tokenizer into
`<cache>/models/<file stem>-<sha256 prefix>/`, and every later start loads that directory in a
fraction of a second. The digest is of the file's bytes: a changed file is converted anew, a moved
or renamed one is not.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from server.model.build_once import build_once

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"


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

    return build_once(target, convert)


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
    save_model(model, str(out / "model.safetensors"))  # tied weights (lm_head = embeddings) stored once
