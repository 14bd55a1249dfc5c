"""The KV budget without --kv-cache-bytes: a share of the device, allocated only as requests need it (issue 12)."""

from __future__ import annotations

import pytest
import torch

from server.engine.admission import EngineRequest
from server.engine.config import EngineConfig
from server.engine.errors import InvalidConfig
from server.engine.loop import Engine
from server.engine.sequence import SamplingParams
from server.machine.memory import CPU_SHARE, _available_ram, default_kv_budget


def test_on_the_cpu_it_is_a_share_of_the_available_ram():
    budget, why = default_kv_budget(torch.device("cpu"), fraction=0.9)
    assert 0 < budget <= _available_ram() * CPU_SHARE * 1.05 + 1  # RAM moves a little between the two reads
    assert budget >= _available_ram() * CPU_SHARE * 0.5
    assert "quarter" in why and "RAM" in why


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, True, "0.9"])
def test_the_fraction_is_checked(fraction):
    with pytest.raises(InvalidConfig, match="kv_cache_memory_fraction"):
        EngineConfig(kv_cache_memory_fraction=fraction)


def test_an_engine_without_a_budget_sizes_it_from_the_device_and_reserves_nothing(base_model, registry):
    engine = Engine(base_model, registry, EngineConfig())
    try:
        assert engine.stats().kv_budget_bytes == pytest.approx(_available_ram() * CPU_SHARE, rel=0.2)
        assert engine.stats().kv_bytes == 0  # nothing up front
        engine.start()
        result = engine.submit(EngineRequest("hello", params=SamplingParams(max_new_tokens=3,
                                                                            ignore_eos=True))).result(30)
        assert result.usage.completion_tokens == 3
    finally:
        engine.shutdown(timeout_s=5)
    explicit = Engine(base_model, registry, EngineConfig(kv_cache_bytes=1 << 20))
    assert explicit.stats().kv_budget_bytes == 1 << 20
