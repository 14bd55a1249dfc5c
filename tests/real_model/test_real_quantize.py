"""--quantize on the real demo (SmolLM2-135M-Instruct, shipped as Q4_1 with a Q8_0 tied embedding): the GGUF's own
blocks held exactly, and each mode's greedy agreement with float32 on the chat questions held to a floor.

The floors are set a little below what `python -m benchmarks.precision` measured on this project's machine (the
same questions, alone and under the demo's soft prompt and prefix, up to 32 tokens; docs/performance.md,
"Quantized weights"): a drop below one is a change in the arithmetic, not noise. No timing is asserted."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from benchmarks import promptswap_engine as pe
from benchmarks.precision import CHAT_QUESTIONS, agreement, chat_tables, run_chat
from prompt_store import PromptRegistry
from server.demo.smollm2 import chat_turn
from server.engine.admission import EngineRequest
from server.engine.sequence import SamplingParams
from server.model.gguf import source_of
from server.model.model_loader import load_base_model
from server.model.weight_only import Int4Linear, _WeightOnly

# mode -> (load_base_model's quantize, quantize_compute, the least share of chat answers equal to float32's)
FLOORS = {
    "int8-weight-only": ("int8-weight-only", "bfloat16", 0.42),  # measured 50.0% (24 of 48)
    "int4-weight-only": ("int4-weight-only", "bfloat16", 0.65),  # measured 72.9% (35 of 48)
    "gguf": ("gguf", "bfloat16", 0.65),  # measured 72.9%: the same codes as int4's (see docs/performance.md)
}


@pytest.fixture(scope="module")
def float32_base(smollm2_dir):
    return load_base_model(smollm2_dir)


@pytest.fixture(scope="module")
def tables(float32_base):
    return chat_tables(float32_base)  # the demo's two tasks, made once from float32: the same bytes for every mode


def chat_tokens(base, tables) -> list[tuple[int, ...]]:
    registry = PromptRegistry(base.geometry, dtype=base.dtype)
    for task, (kind, data) in tables.items():
        registry.put(task, data, kind=kind)
    engine = pe.start_engine(base, registry, 16, 512)
    try:
        return run_chat(engine)
    finally:
        engine.shutdown(timeout_s=10)


@pytest.fixture(scope="module")
def float32_chat(float32_base, tables):
    return chat_tokens(float32_base, tables)


def test_the_demos_q4_1_layers_hold_the_files_weights_exactly(smollm2_dir):
    """Every Q4_1 matrix (210) becomes a 4-bit layer; the kernel's own weight values (read through it with the
    identity) equal gguf's dequantization of the file, bit for bit, q and k rows in transformers' order."""
    base = load_base_model(smollm2_dir, quantize="gguf", onednn_linears=False)
    float32_model = load_base_model(smollm2_dir, onednn_linears=False).model  # transformers' conversion, unpacked
    layers = {name: m for name, m in base.model.named_modules() if isinstance(m, _WeightOnly)}
    assert len(layers) == 30 * 7 and all(type(m) is Int4Linear and m.group_size == 32 for m in layers.values())
    head = base.model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight is base.model.get_input_embeddings().weight  # Q8_0: float32
    reader = gguf.GGUFReader(str(source_of(smollm2_dir)))
    raw = {t.name: t for t in reader.tensors}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.self_attn.k_proj"):  # rows permuted in the file
        assert torch.equal(layers[name].dequantized(), float32_model.get_submodule(name).weight.detach())
    for gguf_name, name in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj"),
                            ("blk.17.attn_v.weight", "model.layers.17.self_attn.v_proj")):
        t = raw[gguf_name]
        expected = torch.from_numpy(np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type)))
        assert torch.equal(layers[name].dequantized(), expected)
    # the Q8_0 table as float32 holds d * q exactly: its 32-weight blocks have one scale each
    t = raw["token_embd.weight"]
    table = torch.from_numpy(np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type)))
    assert torch.equal(base.model.get_input_embeddings().weight.detach(), table)


def test_the_ggufs_blocks_in_float32_give_float32s_tokens(smollm2_dir, float32_base):
    """The same weights summed in another order: two chat answers, token for token (float32 kernels: slow, so few)."""
    exact = load_base_model(smollm2_dir, quantize="gguf")  # --quantize-compute served: float32
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    got = {}
    for label, base in (("float32", float32_base), ("gguf", exact)):
        engine = pe.start_engine(base, PromptRegistry(base.geometry, dtype=base.dtype), 2, 512)
        try:
            handles = [engine.submit(EngineRequest(chat_turn(q), params=params)) for q in CHAT_QUESTIONS[:2]]
            got[label] = [tuple(h.result(timeout=600).token_ids) for h in handles]
        finally:
            engine.shutdown(timeout_s=10)
    assert got["gguf"] == got["float32"]


@pytest.mark.parametrize("mode", list(FLOORS))
def test_each_modes_chat_agreement_holds_its_floor(smollm2_dir, tables, float32_chat, mode):
    quantize, compute, floor = FLOORS[mode]
    base = load_base_model(smollm2_dir, quantize=quantize, quantize_compute=compute)
    measured = agreement(float32_chat, chat_tokens(base, tables))
    assert measured["same_sequences"] >= floor, measured
