"""Load the one frozen base model and its tokenizer, and refuse models promptswap cannot serve."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from prompt_store.dtypes import torch_dtype
from prompt_store.geometry import ModelGeometry
from server.engine.attention import ATTN_IMPLEMENTATION
from server.engine.base_model import BaseModel
from server.engine.errors import ModelNotSupported
from server.model.cpu_linear import pack_linears
from server.model.quantize import DEFAULT_GROUP_SIZE, check_method, quantize_model

log = logging.getLogger(__name__)

def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(dtype)


def check_architecture(name_or_path: str | Path) -> Any:
    """Refuse a model promptswap cannot serve, from its config alone (no weights); returns the config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(name_or_path))
    what = f"{name_or_path} ({config.model_type})"
    if getattr(config, "is_encoder_decoder", False):
        raise ModelNotSupported(f"{what} is an encoder-decoder model; promptswap serves decoder-only causal LMs")
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelNotSupported(f"{what} has no causal-LM head in transformers, so it cannot be served") from None
    if not getattr(model_class, "_supports_attention_backend", False):
        raise ModelNotSupported(
            f"{what} cannot be served: its attention does not support pluggable attention backends in this "
            "transformers version, and promptswap batches requests of different tasks through one"
        )
    return config


def load_base_model(name_or_path: str | Path, device: str | None = None,
                    dtype: str | torch.dtype | None = None, *, device_map: str | dict | None = None,
                    offload_dir: str | Path | None = None, quantize: str | None = None,
                    quantize_group_size: int = DEFAULT_GROUP_SIZE, quantize_compute: str = "served",
                    onednn_linears: bool = True) -> BaseModel:
    """Load a decoder-only causal LM frozen, in eval mode, with promptswap's attention plugged in.

    `quantize` ("int8-weight-only", "int4-weight-only" in groups of `quantize_group_size`, "gguf"; None or
    "none": as loaded) replaces its Linear layers by weight-only ones computing in `quantize_compute`
    (server/model/quantize.py); KernelMissing when the kernel does not run here. Otherwise, on the CPU,
    `onednn_linears` packs them for oneDNN (server/model/cpu_linear.py; `--cpu-linear onednn`): not a quantized
    model's tied head, whose packed copy would add the float32 table's bytes again for ~10% of its matmul's time.

    `device_map` ("auto", "balanced", "sequential", or {module name: device}) spreads the model over the
    visible GPUs, the CPU and `offload_dir` ("disk") with accelerate; each layer's KV pages then live on
    the device where that layer computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name_or_path = str(name_or_path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    quantize = check_method(quantize)
    if quantize != "none" and device_map is not None:
        raise ValueError(f"quantize={quantize!r} quantizes a model on one device, not one spread by a device map")
    config = check_architecture(name_or_path)
    placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_dir}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, attn_implementation=ATTN_IMPLEMENTATION, **placement
        )
    except (ValueError, KeyError) as exc:  # what the config did not tell
        raise ModelNotSupported(
            f"{name_or_path} ({config.model_type}) cannot be served ({type(exc).__name__}: {exc}); promptswap "
            "needs a decoder-only causal LM whose attention goes through transformers' AttentionInterface"
        ) from exc
    if device_map is None:
        model.to(dev)
    model.eval().requires_grad_(False)
    # after the move: the quantized weights are made where they compute
    quantize_model(model, quantize, group_size=quantize_group_size, compute=quantize_compute, source=name_or_path)
    if onednn_linears and quantize == "none" and device_map is None:
        pack_linears(model, dev, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    geometry = ModelGeometry.from_config(model.config, name_or_path)
    max_context = _max_context(model.config, tokenizer)
    name = Path(name_or_path.rstrip("/")).name or name_or_path
    layer_devices: tuple[torch.device, ...] = ()
    if device_map is not None:
        dev = execution_device(model, model.get_input_embeddings(), dev)
        layer_devices = tuple(_layer_devices(model, geometry.num_layers, dev))
        log.info("device map %s: %s", device_map if isinstance(device_map, str) else "given",
                 getattr(model, "hf_device_map", {}))
    where = dev if not layer_devices else ", ".join(sorted({str(d) for d in layer_devices}))
    log.info("loaded %s (%s) on %s in %s%s; context %d", name_or_path, config.model_type, where, torch_dtype,
             "" if quantize == "none" else f", {quantize}", max_context)
    return BaseModel(model, tokenizer, geometry, name, dev, torch_dtype, max_context, layer_devices, quantize)


def execution_device(model: torch.nn.Module, module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where `module` computes under accelerate's device map: its own hook's or the nearest enclosing
    module's execution device (a layer offloaded to CPU RAM or disk computes on the main device), else
    the device of its weights."""
    names = {id(m): name for name, m in model.named_modules()}
    parts = names.get(id(module), "").split(".")
    modules = dict(model.named_modules())
    for end in range(len(parts), -1, -1):
        owner = modules.get(".".join(parts[:end]))
        hook = getattr(owner, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else ():
            found = getattr(h, "execution_device", None)
            if found is not None:
                return torch.device(found)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return default


def _layer_devices(model: torch.nn.Module, num_layers: int, default: torch.device) -> list[torch.device]:
    """The device each decoder layer's attention computes on (attention modules carry their layer_idx)."""
    found: dict[int, torch.device] = {}
    for _, module in model.named_modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and layer not in found and 0 <= layer < num_layers:
            found[layer] = execution_device(model, module, default)
    return [found.get(layer, default) for layer in range(num_layers)]


def _max_context(config, tokenizer) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return 2048
