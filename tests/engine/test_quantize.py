"""--quantize (server/model/quantize.py, server/model/weight_only.py): int8 and int4 weight-only layers on torch's
kernels, and a GGUF's own Q4_1 blocks; opt-in, served through every task kind, never the default.

No timing is asserted here (benchmarks/precision.py and benchmarks/quant_kernels.py measure speed and agreement on
the real demo weights; tests/real_model/test_real_quantize.py holds the demo's agreement floors)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from prompt_store import PromptRegistry
from server.demo.tiny_models import build_tiny_model
from server.engine.admission import EngineRequest
from server.engine.config import EngineConfig
from server.engine.errors import ModelNotSupported
from server.engine.loop import Engine
from server.engine.sequence import SamplingParams
from server.model import quantize
from server.model.gguf import converted_dir, q4_1_weights
from server.model.model_loader import load_base_model
from server.model.weight_only import Int4Linear, Int8Linear, _WeightOnly, kernel_missing
from tests.engine.conftest import ADAPTERS, make_adapter
from tests.gguf_files import write_tiny_qwen2_gguf

INT8, INT4 = "int8-weight-only", "int4-weight-only"
GREEDY8 = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def q4_1_dir(tmp_path_factory):
    """A tiny Qwen2 whose decoder matrices are Q4_1 in its GGUF file, converted as any GGUF is."""
    out = tmp_path_factory.mktemp("q4_1")
    path, _ = write_tiny_qwen2_gguf(out / "file", q4_1=True)
    return converted_dir(path, out / "cache")


def weight_only_layers(model: torch.nn.Module) -> dict[str, _WeightOnly]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _WeightOnly)}


def serve_every_task_kind(base, model_dir, tmp_path) -> None:
    """A soft prompt, a prefix and no task, greedy, through a started engine."""
    registry = PromptRegistry(base.geometry, tmp_path / "prompts", dtype=base.dtype)
    for i, task in enumerate(("pt8", "prefix16")):
        registry.put_path(task, make_adapter(model_dir, ADAPTERS[task], tmp_path / task, seed=i))
    engine = Engine(base, registry, EngineConfig(max_running=4))
    engine.start()
    try:
        handles = {task: engine.submit(EngineRequest("the quick brown fox", task=task, params=GREEDY8))
                   for task in ("pt8", "prefix16", None)}
        for handle in handles.values():
            done = handle.result(timeout=120)
            assert len(done.token_ids) == 8 and done.usage.completion_tokens == 8
        assert engine.stats().prompt_cache_misses >= 2  # both tasks' prefixes went through the quantized model
    finally:
        engine.shutdown(timeout_s=5)


def test_the_default_load_is_float32_and_not_quantized(llama_dir):
    base = load_base_model(llama_dir)
    assert base.dtype == torch.float32 and base.quantize == "none"
    assert not weight_only_layers(base.model)


@pytest.mark.parametrize(("method", "compute"), [(INT8, "served"), (INT4, "bfloat16")])
def test_weight_only_layers_serve_soft_prompt_and_prefix_tasks(llama_dir, tmp_path, method, compute):
    base = load_base_model(llama_dir, quantize=method, quantize_compute=compute)
    assert base.quantize == method and base.dtype == torch.float32
    layers = weight_only_layers(base.model)
    kind = Int8Linear if method == INT8 else Int4Linear
    assert layers and all(type(m) is kind for m in layers.values())
    assert "lm_head" in layers  # the tiny llama's head is untied: quantized too
    assert not any(type(m) is torch.nn.Linear for m in base.model.modules())
    expected = torch.float32 if compute == "served" else torch.bfloat16
    assert all(m.compute_dtype == expected for m in layers.values())
    embeddings = base.model.get_input_embeddings().weight  # what the soft prompts are concatenated with
    assert type(embeddings) is torch.nn.Parameter and embeddings.dtype == torch.float32
    serve_every_task_kind(base, llama_dir, tmp_path)


@pytest.mark.parametrize("compute", ["served", "bfloat16"])
def test_gguf_serves_the_files_q4_1_blocks_through_every_task_kind(q4_1_dir, tmp_path, compute):
    base = load_base_model(q4_1_dir, quantize="gguf", quantize_compute=compute)
    layers = weight_only_layers(base.model)
    assert len(layers) == 2 * 7 and all(type(m) is Int4Linear and m.group_size == 32 for m in layers.values())
    assert type(base.model.get_output_embeddings()) is not Int4Linear  # float32 in the file: as it was
    serve_every_task_kind(base, q4_1_dir, tmp_path)


def test_the_q4_1_layers_hold_the_ggufs_own_weight_values(q4_1_dir):
    """Through the kernel itself (the identity's rows times the weight), in float32: bit for bit what gguf's
    dequantization gives, q and k rows in the model's order, and their outputs F.linear's to rounding."""
    float_model = load_base_model(q4_1_dir, onednn_linears=False).model
    base = load_base_model(q4_1_dir, quantize="gguf", onednn_linears=False)
    path = (q4_1_dir / "gguf_source").read_text().strip()
    reader = gguf.GGUFReader(path)
    blocks = q4_1_weights(path, float_model)
    assert len(blocks) == 14
    for name, layer in weight_only_layers(base.model).items():
        held = layer.dequantized()
        assert torch.equal(held, float_model.get_submodule(name).weight.detach())  # transformers' conversion
        assert torch.equal(held, blocks[name].dequantized())
    # the file's own tensor, dequantized by gguf (Qwen2 keeps the file's row order)
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    expected = torch.from_numpy(np.ascontiguousarray(gguf.dequantize(tensor.data, tensor.tensor_type)))
    assert torch.equal(weight_only_layers(base.model)["model.layers.1.mlp.down_proj"].dequantized(), expected)
    x = torch.randn(3, 5, 64)
    layer = weight_only_layers(base.model)["model.layers.0.mlp.up_proj"]
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dequantized()), rtol=1e-5, atol=1e-5)


def test_gguf_in_float32_gives_the_float32_models_tokens(q4_1_dir, tmp_path):
    """Same weights, another summation order: the logits agree to float32 rounding."""
    float_model = load_base_model(q4_1_dir).model
    quantized = load_base_model(q4_1_dir, quantize="gguf").model
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(quantized(ids).logits, float_model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_the_layers_compute_linear_on_the_weights_they_hold(compute_dtype):
    g = torch.Generator().manual_seed(0)
    weight, bias, x = torch.randn(96, 128, generator=g), torch.randn(96, generator=g), torch.randn(2, 3, 128,
                                                                                                 generator=g)
    tol = 1e-4 if compute_dtype == torch.float32 else 3e-2  # bfloat16: the input is rounded on its way in
    for layer in (Int8Linear.quantize(weight, bias, compute_dtype), Int4Linear.quantize(weight, bias, 64,
                                                                                        compute_dtype)):
        held = layer.dequantized()
        assert (held - weight).abs().max() <= (weight.abs().max() / 127 if type(layer) is Int8Linear else 0.5)
        want = torch.nn.functional.linear(x, held, bias)
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (2, 3, 96)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 10)


def test_an_int4_layer_holds_code_minus_8_times_scale_plus_zero():
    codes = torch.randint(0, 16, (48, 64), generator=torch.Generator().manual_seed(1))
    # fp16 values, as a Q4_1 block's: (code - 8) * scale is then exact in float32, one rounding in all
    scales, zeros = (torch.rand(48, 2) + 0.1).half().float(), torch.randn(48, 2).half().float()
    layer = Int4Linear(codes, scales, zeros, 32, None, torch.float32)
    expected = (codes.float() - 8).view(48, 2, 32) * scales[..., None] + zeros[..., None]
    assert torch.equal(layer.dequantized(), expected.view(48, 64))


def test_a_tied_output_head_stays_the_embedding_table(tmp_path):
    base = load_base_model(build_tiny_model(tmp_path / "tied", tie_word_embeddings=True), quantize=INT8,
                           onednn_linears=False)
    model = base.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert "lm_head" not in weight_only_layers(model) and len(weight_only_layers(model)) == 2 * 7


def test_a_model_without_linear_layers_is_refused(gpt2_dir):
    with pytest.raises(ModelNotSupported, match=r"no torch\.nn\.Linear layer"):
        load_base_model(gpt2_dir, quantize=INT8)  # GPT-2's layers are Conv1D and its head is tied


def test_gguf_on_a_model_not_converted_from_one_is_one_clear_error(llama_dir):
    with pytest.raises(ModelNotSupported) as caught:
        load_base_model(llama_dir, quantize="gguf")
    assert "\n" not in str(caught.value) and "was not converted from a GGUF file" in str(caught.value)


def test_a_missing_kernel_is_one_clear_line(llama_dir, monkeypatch):
    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_weight_int8pack_mm' with arguments from the 'CPU' backend.\n"
                                  "more lines")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", missing)
    with pytest.raises(quantize.KernelMissing) as caught:
        load_base_model(llama_dir, quantize=INT8)
    assert str(caught.value) == (
        f"--quantize int8-weight-only: torch {torch.__version__} has no usable torch._weight_int8pack_mm for "
        "torch.float32 on cpu (NotImplementedError: Could not run 'aten::_weight_int8pack_mm' with arguments from "
        "the 'CPU' backend.)")
    assert kernel_missing("int4", torch.device("cuda"), torch.bfloat16) == (
        "torch._weight_int4pack_mm_for_cpu runs on the CPU only; this model is on cuda")


def test_bad_quantize_arguments_are_refused(llama_dir):
    with pytest.raises(ValueError, match="quantize must be one of none, int8-weight-only, int4-weight-only, gguf, "
                                         "got 'int3'"):
        load_base_model(llama_dir, quantize="int3")
    with pytest.raises(ValueError, match="not one spread by a device map"):
        load_base_model(llama_dir, quantize=INT8, device_map="auto")
    with pytest.raises(ValueError, match="a 4-bit group must be one of 32, 64, 128, 256 inputs and divide the "
                                         "layer's 64; got 128"):
        load_base_model(llama_dir, quantize=INT4, quantize_group_size=128)
    with pytest.raises(ValueError, match=r"rounds a float32 model's Linear inputs; this model is torch\.bfloat16"):
        load_base_model(llama_dir, dtype="bfloat16", quantize=INT8, quantize_compute="bfloat16")
