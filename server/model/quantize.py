"""Opt-in weight-only quantization of the base model (`--quantize`), never the default.

- `int8-weight-only`: each decoder Linear weight as int8, one scale per output row (server/model/weight_only.py).
- `int4-weight-only`: 4-bit codes, a scale and a zero per group of `--quantize-group-size` inputs.
- `gguf`: a model converted from a GGUF file (the demo's, or --model x.gguf) keeps the file's own Q4_1 blocks: a
  Q4_1 block (32 weights, w = d * q + m, fp16 d and m) is a 4-bit group with scale d and zero m + 8d, which float32
  holds exactly (checked at load against the float32 copy the conversion made, bit for bit, else it refuses). Other
  GGUF types keep today's float32 copy: the demo's Q8_0 tied embedding and head among them (the kernels take one
  scale per row or per 4-bit group, none a Q8_0 block's; as float32 they hold the Q8_0 values exactly).

The kernels compute in `compute` ("served": the model's dtype; "bfloat16": a float32 model's Linear inputs rounded
to bfloat16 for the kernel, with scales in bfloat16, which is where torch's CPU kernels are fast). Activations, the
KV cache and the soft prompts and prefixes stay in the model's dtype either way. The input embeddings are no
Linear and stay as they are; so does an output head tied to them (a second, quantized copy of the table measured
slower and further from float32 on SmolLM2). An untied head is quantized with the rest.

Greedy tokens differ from float32's for some requests: `python -m benchmarks.precision` measures how many and how
fast each mode is (docs/performance.md, "Quantized weights").

Torch-free at import: the settings read the names without loading torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from server.engine.errors import ModelNotSupported

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

QuantizeName = Literal["none", "int8-weight-only", "int4-weight-only", "gguf"]
QUANTIZE_NAMES: tuple[str, ...] = get_args(QuantizeName)
QuantizeCompute = Literal["served", "bfloat16"]
COMPUTE_NAMES: tuple[str, ...] = get_args(QuantizeCompute)
GROUP_SIZES = (32, 64, 128, 256)  # the 4-bit groups torch's CPU kernel takes
DEFAULT_GROUP_SIZE = 32  # a Q4_1 block's, and a divisor of every Llama-family width


class KernelMissing(ModelNotSupported):
    """The weight-only kernel a --quantize method needs does not run on this device or dtype."""


def check_method(method: str | None) -> str:
    """The method's name (None: "none"); ValueError naming the choices for an unknown one."""
    method = "none" if method in (None, "") else method
    if method not in QUANTIZE_NAMES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_NAMES)}, got {method!r}")
    return method


def quantize_model(model: torch.nn.Module, method: str | None, *, group_size: int = DEFAULT_GROUP_SIZE,
                   compute: str = "served", source: str | Path | None = None) -> int:
    """Replace `model`'s Linear layers by weight-only ones per `method`; returns how many were replaced.

    `source` is the model's directory (`gguf` reads the file it was converted from). KernelMissing, in one line,
    when the method's kernel does not run on the model's device and dtype; ModelNotSupported when the model has
    no layer the method would replace."""
    import torch

    from server.model import weight_only

    method = check_method(method)
    if method == "none":
        return 0
    if compute not in COMPUTE_NAMES:
        raise ValueError(f"quantize compute must be one of {', '.join(COMPUTE_NAMES)}, got {compute!r}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    compute_dtype = dtype if compute == "served" else torch.bfloat16
    if compute == "bfloat16" and dtype != torch.float32:
        raise ValueError(f"--quantize-compute bfloat16 rounds a float32 model's Linear inputs; this model is {dtype}")
    kind = "int8" if method == "int8-weight-only" else "int4"
    missing = weight_only.kernel_missing(kind, device, compute_dtype, group_size if kind == "int4" else 32)
    if missing is not None:
        raise KernelMissing(f"--quantize {method}: {missing}")
    tied = _tied_output_head(model)
    if method == "gguf":
        replaced = _from_gguf(model, source, compute_dtype)
    else:
        replaced = []
        for name, module in list(model.named_modules()):
            if type(module) is not torch.nn.Linear or module is tied:
                continue
            bias = None if module.bias is None else module.bias.detach()
            layer = (weight_only.Int8Linear.quantize(module.weight, bias, compute_dtype) if kind == "int8" else
                     weight_only.Int4Linear.quantize(module.weight, bias, group_size, compute_dtype))
            model.set_submodule(name, layer)  # one at a time: each float weight is freed as its copy is made
            replaced.append(name)
    if device.type == "cpu" and compute_dtype != torch.bfloat16:
        log.warning("--quantize %s computes in %s: torch's CPU weight-only kernels are reference loops outside "
                    "bfloat16, measured 5-20x slower than float32's matmuls (benchmarks/quant_kernels.py); "
                    "--quantize-compute bfloat16 runs the fast ones", method, compute_dtype)
    if not replaced:  # GPT-2's layers, for one, are transformers' Conv1D
        raise ModelNotSupported(f"--quantize {method} found no torch.nn.Linear layer to quantize in this "
                                f"{type(model).__name__}; serve it without --quantize")
    log.info("%d Linear layers %s on %s, computing in %s%s", len(replaced),
             {"int8": "in int8", "int4": f"in 4-bit groups of {group_size}"}[kind] if method != "gguf"
             else "keep the GGUF's Q4_1 blocks", weight_only.KERNELS[kind], compute_dtype,
             "; the output head is tied to the input embeddings and stays as it is" if tied is not None else "")
    return len(replaced)


def _from_gguf(model: torch.nn.Module, source: str | Path | None, compute_dtype: torch.dtype) -> list[str]:
    """Each Linear layer whose weight the GGUF file stores as Q4_1 becomes an Int4Linear of those very blocks."""
    import torch

    from server.model.gguf import Q4_1_BLOCK, q4_1_weights, source_of
    from server.model.weight_only import Int4Linear

    gguf = None if source is None else source_of(source)
    if gguf is None:
        raise ModelNotSupported(f"--quantize gguf serves a GGUF file's own blocks; {source} was not converted from "
                                "a GGUF file that is still there (serve the demo or --model file.gguf)")
    weights = q4_1_weights(gguf, model)
    replaced = []
    for name, q in weights.items():
        module = model.get_submodule(name)
        if type(module) is not torch.nn.Linear:
            continue
        if not torch.equal(q.dequantized(), module.weight.detach().float().cpu()):
            raise ModelNotSupported(f"--quantize gguf: {name}'s Q4_1 blocks in {gguf.name} do not give the weights "
                                    "transformers' conversion loaded; serve it without --quantize")
        scales, zeros = q.d, q.m + 8 * q.d  # exact in float32: fp16 d and m, checked by the tests
        bias = None if module.bias is None else module.bias.detach()
        layer = Int4Linear(q.codes.to(torch.int32), scales, zeros, Q4_1_BLOCK, bias, compute_dtype)
        model.set_submodule(name, layer.to(module.weight.device))
        replaced.append(name)
    return replaced


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
