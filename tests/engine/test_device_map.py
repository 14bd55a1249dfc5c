"""--device-map: a model spread by accelerate (here part of it offloaded to "disk", which runs accelerate's
hooks: weights stream in per forward; an all-"cpu" map would prove nothing) gives PEFT's tokens, and each
layer's KV pages live on the device where that layer computes."""

from __future__ import annotations

import pytest
import torch

from server.engine.admission import EngineRequest
from server.engine.config import EngineConfig
from server.engine.loop import Engine
from server.engine.sequence import SamplingParams
from server.model.model_loader import load_base_model


def half_on_disk(model_dir) -> dict[str, str]:
    """{module name: device}: the backbone's parts on the CPU, its second half of decoder layers on disk."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    (layers_name,) = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    backbone = layers_name.rpartition(".")[0]
    layers = model.get_submodule(layers_name)
    placement = {f"{layers_name}.{i}": "cpu" if i < len(layers) // 2 else "disk" for i in range(len(layers))}
    for name, _ in model.get_submodule(backbone).named_children():
        if f"{backbone}.{name}" != layers_name:
            placement[f"{backbone}.{name}"] = "cpu"
    for name, _ in model.named_children():
        if name != backbone:
            placement[name] = "cpu"
    return placement


@pytest.fixture(scope="module")
def spread_model(model_dir, tmp_path_factory):
    placement = half_on_disk(model_dir)
    assert "disk" in placement.values()
    return load_base_model(model_dir, device_map=placement, offload_dir=tmp_path_factory.mktemp("offload"))


def test_layers_offloaded_to_disk_compute_through_accelerate_hooks(spread_model):
    base = spread_model
    assert "disk" in set(base.model.hf_device_map.values())
    hooked = [m for m in base.model.modules() if hasattr(m, "_hf_hook")]
    assert hooked, "accelerate's hooks are what a device map runs through"
    assert base.devices_of_layers() == [torch.device("cpu")] * base.geometry.num_layers  # disk layers compute on cpu


def test_a_spread_model_gives_the_peft_tokens(spread_model, registry, reference):
    engine = Engine(spread_model, registry, EngineConfig(max_running=8))
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=10, ignore_eos=True)
        cases = [("pt8", "the quick brown fox"), ("prefix16", "select price from model"), (None, "hello world"),
                 ("ptune5", "café über 東京")]
        handles = [engine.submit(EngineRequest(text, task=task, params=params)) for task,
                   text in cases]  # one mixed batch
        for (task, text), handle in zip(cases, handles, strict=True):
            assert list(handle.result(timeout=60).token_ids) == reference.greedy(task, text, 10), task
    finally:
        engine.shutdown(timeout_s=5)


def test_each_layer_keeps_its_kv_on_its_own_device():
    """Layers on two devices (the CPU under two names is enough to tell them apart): each layer's pages are
    stored, written and gathered on its own, and clearing reaches every one."""
    from server.engine.kv import PagedKV
    from server.engine.pages import PAGE_SIZE

    cpu = torch.device("cpu")
    meta_free = [cpu, torch.device("cpu", 0)]  # distinct keys, same memory: what two GPUs would be
    kv = PagedKV(2, 2, 4, dtype=torch.float32, devices=meta_free, total_pages=4)
    kv.ensure(4)
    assert len(kv.storage()) == 2  # one pair of tensors per device
    rows = torch.arange(PAGE_SIZE, 2 * PAGE_SIZE)
    for layer in range(2):
        kv.write(layer, torch.full((2, PAGE_SIZE, 4), layer + 1.0), torch.full((2, PAGE_SIZE, 4), -1.0), rows)
    for layer in range(2):
        keys, _ = kv.gather(layer, torch.tensor([1]))
        assert keys.eq(layer + 1.0).all()
    kv.clear(torch.tensor([1]))
    assert all(k.eq(0).all() for k, _ in kv.storage())
