"""--cpu-linear onednn (server/model/cpu_linear.py): the default on the CPU, the same greedy tokens as torch's own
kernels and PEFT's (tests/engine/test_fidelity.py runs on it), and left off, with the reason logged, wherever a
probe finds it unusable. No timing is asserted (benchmarks/llama_cpp.py's comparison measures it)."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from server.config import Settings, explain
from server.model import cpu_linear
from server.model.cpu_linear import (
    CACHE_CAPACITY,
    PackedLinear,
    cap_primitive_caches,
    pack_linears,
    padded_rows,
    unusable_reason,
)
from server.model.model_loader import load_base_model
from server.process.cli import build_parser

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
    with caplog.at_level(logging.INFO, logger="server.model.cpu_linear"):
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
    with caplog.at_level(logging.INFO, logger="server.model.cpu_linear"):
        assert pack_linears(model, CPU, torch.float32) == 0
    assert "this model's code does not run on packed layers (AttributeError" in caplog.text
    assert not linears(model, PackedLinear)
    for (name, got), want in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
    assert greedy(model, list(range(5, 20)), 3)[0] == greedy(plain, list(range(5, 20)), 3)[0]


def test_row_counts_are_padded_to_a_few_sizes():
    """Each row count oneDNN sees is a primitive it builds and keeps (~600 KiB): a step's tokens vary, so the packed
    layers compute one of 8 sizes per doubling, never more than 1/8 extra rows."""
    sizes = [padded_rows(n) for n in range(0, 5000)]
    assert sizes[:17] == list(range(17))  # up to 16 rows, as they are
    assert [padded_rows(n) for n in (17, 18, 19, 33, 65, 100, 129, 300, 511, 512, 513)] == \
        [18, 18, 20, 36, 72, 104, 144, 320, 512, 512, 576]
    assert all(n <= p <= max(n, 1) * 1.125 for n, p in enumerate(sizes))
    assert sizes == sorted(sizes) and all(padded_rows(p) == p for p in sizes)
    assert len({padded_rows(n) for n in range(1, 513)}) == 56 and len({padded_rows(n) for n in range(1, 1025)}) == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_rows_give_what_torch_gives(dtype):
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(24, 40, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 24, generator=g))
    packed = PackedLinear(linear)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.inference_mode():
        for shape in [(0, 24), (1, 24), (17, 24), (1, 33, 24), (2, 50, 24), (1, 300, 24)]:
            x = torch.randn(*shape, generator=g).to(dtype)
            got = packed(x)
            assert got.shape == (*shape[:-1], 40) and got.dtype == dtype and got.is_contiguous()
            torch.testing.assert_close(got.float(), linear(x).float(), atol=tol, rtol=tol)


def test_onednn_builds_primitives_only_for_the_padded_sizes(capfd):
    """What bounds the memory: oneDNN's verbose log names every primitive torch's op asks for (created or found in
    the cache), and over 1 to 200 rows they are the 45 padded sizes, not 200 shapes."""
    packed = PackedLinear(torch.nn.Linear(24, 40))
    with torch.inference_mode(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        for rows in range(1, 201):
            packed(torch.randn(1, rows, 24))
    ctypes.CDLL(None).fflush(None)  # oneDNN writes with C's stdio
    log = capfd.readouterr().out
    seen = {int(m) for m in re.findall(r"inner_product,.*,mb(\d+)ic24oc40,", log)}
    if not seen:
        pytest.skip("this torch's oneDNN wrote no verbose log")
    assert seen == {padded_rows(n) for n in range(1, 201)} and len(seen) == 45


def test_the_caches_capacity_is_set_unless_the_environment_sets_it():
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] and os.environ["LRU_CACHE_CAPACITY"]  # at import
    env: dict[str, str] = {}
    assert cap_primitive_caches(environ=env) == env == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(CACHE_CAPACITY),
                                                        "LRU_CACHE_CAPACITY": str(CACHE_CAPACITY)}
    env = {"DNNL_PRIMITIVE_CACHE_CAPACITY": "7", "LRU_CACHE_CAPACITY": "9"}  # oneDNN's older name, the user's
    assert cap_primitive_caches(64, environ=env) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7", "LRU_CACHE_CAPACITY": "9"}
    assert env == {"DNNL_PRIMITIVE_CACHE_CAPACITY": "7", "LRU_CACHE_CAPACITY": "9"}
    env = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "3"}
    assert cap_primitive_caches(64, environ=env) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "3", "LRU_CACHE_CAPACITY": "64"}


_EVICTION_PROBE = """
import ctypes, sys, torch
from server.model.model_loader import load_base_model  # as the service imports it: cpu_linear sets the capacity
from server.model.cpu_linear import PackedLinear

layer = PackedLinear(torch.nn.Linear(8, 8))

def call(rows):  # torch's op itself, unpadded: one primitive per row count
    torch.ops.mkldnn._linear_pointwise(torch.ones(rows, 8), layer.packed_weight, layer.bias, "none", [], "")

with torch.inference_mode():
    for rows in range(1, int(sys.argv[1]) + 2):
        call(rows)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        call(1)
ctypes.CDLL(None).fflush(None)
"""


def test_the_capacity_reaches_onednn_when_the_service_imports_the_engine():
    """Set in the environment at import, the capacity is what oneDNN's cache holds in a fresh process: after
    CACHE_CAPACITY other shapes the first one was evicted and is built again; with a larger capacity in the
    environment (the control) it is found in the cache."""
    def first_shape_again(capacity: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "ONEDNN_VERBOSE")}
        env |= {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": capacity} if capacity else {}
        out = subprocess.run([sys.executable, "-c", _EVICTION_PROBE, str(CACHE_CAPACITY)], env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return re.findall(r"primitive,create:(cache_\w+),cpu,inner_product,.*,mb1ic8oc8,", out)

    ours, control = first_shape_again(None), first_shape_again(str(8 * CACHE_CAPACITY))
    if not control:
        pytest.skip("this torch's oneDNN wrote no verbose log")
    assert (ours, control) == (["cache_miss"], ["cache_hit"])
