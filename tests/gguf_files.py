"""Tiny GGUF checkpoints written with the `gguf` package's writer, the way llama.cpp's converter names
tensors, so the GGUF path is tested on an architecture other than the demo's Llama."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from server.demo.tiny_models import build_tokenizer


def write_tiny_qwen2_gguf(out_dir: Path, seed: int = 0, q4_1: bool = False) -> tuple[Path, torch.nn.Module]:
    """A 2-layer Qwen2 (q/k/v biases, GQA) as float32 GGUF with its BPE tokenizer; returns (file, the model).
    With `q4_1`, the decoder layers' matrices are stored as Q4_1 blocks (gguf's own quantizer), llama.cpp's usual
    4-bit type; the returned model then holds float32 weights, not the file's."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir / "tokenizer")
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        rope_theta=10000.0, eos_token_id=eos, bos_token_id=eos, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()

    path = out_dir / f"tiny-qwen2-{seed}{'-q4_1' if q4_1 else ''}.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    spec = json.loads((out_dir / "tokenizer" / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i == eos else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        gguf_name, data = names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy()
        if q4_1 and name.startswith("model.layers.") and data.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q4_1
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model
