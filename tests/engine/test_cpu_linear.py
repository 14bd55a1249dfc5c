"""--cpu-linear onednn (server/engine/cpu_linear.py): the default on the CPU, the same greedy tokens as torch's own
kernels and PEFT's (tests/engine/test_fidelity.py runs on it), and left off, with the reason logged, wherever a
probe finds it unusable. No timing is asserted (benchmarks/llama_cpp.py's comparison measures it)."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError

from server.cli import build_parser
from server.config import Settings, explain
from server.engine import cpu_linear
from server.engine.cpu_linear import PackedLinear, pack_linears, unusable_reason
from server.engine.model_loader import load_base_model

CPU = torch.device("cpu")


def linears(model: torch.nn.Module, kind: type) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m) is kind]


def greedy(model: torch.nn.Module, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of `ids` with full forward passes, and the first step's logits."""
    ids, first = list(ids), None
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            first = logits if first is None else first
            ids.append(int(logits.argmax()))
    return ids, first


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """Linear layers with biases (q, k and v)."""
    from transformers import Qwen2Config

    from server.demo.tiny_models import build_model_from_config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    return build_model_from_config(tmp_path_factory.mktemp("qwen2"), config)


@pytest.mark.parametrize("model", ["llama_dir", "qwen2_dir"])
def test_packed_layers_compute_what_torch_computes(model, request):
    path = request.getfixturevalue(model)
    packed, plain = load_base_model(path), load_base_model(path, onednn_linears=False)
    assert not linears(packed.model, torch.nn.Linear) and linears(packed.model, PackedLinear)
    assert not linears(plain.model, PackedLinear) and linears(plain.model, torch.nn.Linear)
    ids = list(range(5, 30))
    got, got_logits = greedy(packed.model, ids, 6)
    want, want_logits = greedy(plain.model, ids, 6)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)  # float32 both, summed in other orders


def test_a_tied_head_is_packed_and_the_embeddings_stay(tmp_path):
    from server.demo.tiny_models import build_tiny_model

    base = load_base_model(build_tiny_model(tmp_path / "tied", tie_word_embeddings=True))
    assert type(base.model.get_output_embeddings()) is PackedLinear
    assert type(base.model.get_input_embeddings()) is torch.nn.Embedding


def test_where_it_cannot_serve_it_says_why_and_leaves_the_model_alone(llama_dir, monkeypatch, caplog):
    assert unusable_reason(torch.device("meta"), torch.float32) == "the model is on meta"
    assert "float16 is not one of" in unusable_reason(CPU, torch.float16)
    assert unusable_reason(CPU, torch.float32) is None and unusable_reason(CPU, torch.bfloat16) is None

    def refused(self, x):  # a torch whose internal op is gone or changed its signature
        raise RuntimeError("mkldnn::_linear_pointwise() is not available")

    monkeypatch.setattr(cpu_linear.PackedLinear, "forward", refused)
    with caplog.at_level(logging.INFO, logger="server.engine.cpu_linear"):
        base = load_base_model(llama_dir)
    assert linears(base.model, torch.nn.Linear) and not linears(base.model, PackedLinear)
    assert "Linear layers on torch's own kernels: oneDNN's packed linear is not usable here" in caplog.text
    assert pack_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)), CPU, torch.float16) == 0


def test_the_setting_defaults_to_onednn_and_names_its_choices(monkeypatch):
    monkeypatch.delenv("PROMPTSWAP_CPU_LINEAR", raising=False)
    assert Settings().cpu_linear == "onednn"
    monkeypatch.setenv("PROMPTSWAP_CPU_LINEAR", "torch")
    assert Settings().cpu_linear == "torch"
    with pytest.raises(ValidationError) as caught:
        Settings(cpu_linear="mkl")
    assert explain(caught.value) == ("--cpu-linear / PROMPTSWAP_CPU_LINEAR: Input should be 'onednn' or 'torch', "
                                     "got 'mkl'")
    assert build_parser().parse_args(["serve", "--cpu-linear", "torch"]).cpu_linear == "torch"


def test_a_model_whose_code_reads_a_layer_weight_keeps_torch_layers(llama_dir, caplog):
    """Some transformers models read `self.lm_head.weight.dtype` in their forward: a packed layer has no weight,
    so the forward pass at load fails and torch's layers come back, holding the same weights."""
    plain = load_base_model(llama_dir, onednn_linears=False).model
    model = load_base_model(llama_dir, onednn_linears=False).model
    reads_weight = model.model.forward

    def forward(*args, **kwargs):
        assert model.lm_head.weight.dtype == torch.float32  # what such a model's code does
        return reads_weight(*args, **kwargs)

    model.model.forward = forward
    with caplog.at_level(logging.INFO, logger="server.engine.cpu_linear"):
        assert pack_linears(model, CPU, torch.float32) == 0
    assert "this model's code does not run on packed layers (AttributeError" in caplog.text
    assert not linears(model, PackedLinear)
    for (name, got), want in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
    assert greedy(model, list(range(5, 20)), 3)[0] == greedy(plain, list(range(5, 20)), 3)[0]
