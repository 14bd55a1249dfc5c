"""Smoke test of the benchmark: the whole pipeline on a tiny model, and baselines that are honest.

The benchmark itself never runs in CI; this checks that it runs end to end, that its JSON holds
every system with promptswap's ratios, and that the transformers baselines compute what PEFT
trains with (else their speed would not be comparable). No wall-clock assertions.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import baselines
from benchmarks.hf_generate import HFGenerator
from benchmarks.run import main
from benchmarks.throughput import LLAMA_CPP, SYSTEMS
from benchmarks.workload import WorkloadSpec, embedding_std, make_workload
from prompt_store.geometry import ModelGeometry
from tests.peft_reference import greedy

STEPS = 3  # greedy tokens compared against the PEFT reference


@pytest.fixture(scope="module")
def hf(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    return HFGenerator(model, AutoTokenizer.from_pretrained(llama_dir))


@pytest.fixture(scope="module")
def workload(hf):
    spec = WorkloadSpec(num_requests=12, num_tasks=4, text_len=(3, 24), max_new_tokens=(STEPS, STEPS),
                        virtual_tokens=(2, 9), seed=3)
    return make_workload(spec, hf.geometry, embedding_std(hf.model), hf.tokenizer)


def peft_greedy(model_dir, task, ids: list[int], steps: int) -> list[int]:
    """The reference: PeftModel.forward on the whole sequence, no cache, one request (DESIGN.md)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = ModelGeometry.from_config(base.config)
    common = dict(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=task.num_virtual, num_layers=g.num_layers,
                  num_transformer_submodules=1)
    if task.kind == "prompt":
        config = PromptTuningConfig(token_dim=g.hidden_size, num_attention_heads=base.config.num_attention_heads,
                                    **common)
    else:  # PEFT writes kv heads as attention heads under grouped-query attention
        config = PrefixTuningConfig(token_dim=g.kv_dim, num_attention_heads=g.num_kv_heads, **common)
    peft_model = get_peft_model(base, config).eval()
    with torch.inference_mode():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(task.table)
    return greedy(peft_model, ids, steps)


def test_workload_is_seeded_and_shaped(hf, workload):
    again = make_workload(WorkloadSpec(num_requests=12, num_tasks=4, text_len=(3, 24),
                                       max_new_tokens=(STEPS, STEPS), virtual_tokens=(2, 9), seed=3),
                          hf.geometry, embedding_std(hf.model), hf.tokenizer)
    assert [r.text for r in again.requests] == [r.text for r in workload.requests]
    kinds = sorted(t.kind for t in workload.tasks.values())
    assert kinds == ["prefix", "prefix", "prompt", "prompt"]
    assert any(r.task is None for r in workload.requests)
    for t in workload.tasks.values():
        assert t.table.shape == (t.num_virtual, hf.geometry.width_for(t.kind))
        assert torch.equal(again.tasks[t.name].table, t.table)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_baselines_match_peft_forward(llama_dir, hf, workload, kind):
    """Alone and in a left-padded batch of its task, a request gets the PEFT reference's tokens."""
    task = next(t for t in workload.tasks.values() if t.kind == kind)
    reqs = [r for r in workload.requests if r.task == task.name]
    assert len(reqs) >= 2 and len({len(hf.encode(r.text)) for r in reqs}) > 1  # padding is exercised
    expected = [peft_greedy(llama_dir, task, hf.encode(r.text), STEPS) for r in reqs]
    alone = [hf.generate(task, [r.text], [STEPS]).token_ids[0] for r in reqs]
    batched = hf.generate(task, [r.text for r in reqs], [STEPS] * len(reqs)).token_ids
    assert alone == expected
    assert batched == expected


def test_grouped_batches_hold_one_task(hf, workload):
    results = baselines.run_grouped_by_task(hf, workload, batch_size=8)
    assert sorted(r.id for r in results) == [r.id for r in workload.requests]
    assert all(len(r.token_ids) == STEPS for r in results)


def test_run_writes_every_system_and_ratios(llama_dir, tmp_path, capsys):
    # llama.cpp serves the real demo's GGUF from a binary built outside CI (tests/real_model runs it when built).
    systems = [s for s in SYSTEMS if (s != "promptswap-http" or _http_available()) and s not in LLAMA_CPP]
    argv = ["--model", str(llama_dir), "--requests", "10", "--tasks", "4", "--concurrency", "2,8",
            "--max-new-tokens", "2,4", "--text-len", "3,16", "--virtual-tokens", "2,8",
            "--systems", ",".join(systems), "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 0
    for c in ("2", "8"):
        block = data["by_concurrency"][c]
        assert set(block["summaries"]) == set(systems)
        assert set(block["ratios"]) == set(systems) - {"promptswap"}
        for s in block["summaries"].values():
            assert s["generated_tokens"] == sum(data["workload"]["max_new_tokens"])
            assert s["tokens_per_s"] > 0
        # Exact greedy agreement: the engine and the baselines compute the same thing.
        assert block["agreement"]["promptswap vs one-at-a-time"] == 1.0
    assert "promptswap" in capsys.readouterr().out


def test_ttft_mode(llama_dir, tmp_path):
    argv = ["--mode", "ttft", "--model", str(llama_dir), "--ttft-sizes", "1,16", "--repeats", "1",
            "--text-len", "8", "--out", str(tmp_path), "--quiet", "--systems", "promptswap,one-at-a-time"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "ttft.json").read_text())
    assert [r["num_virtual"] for r in data["rows"]] == [1, 16]
    for row in data["rows"]:
        assert set(row["ttft_s"]) == {"promptswap", "promptswap-first-use", "one-at-a-time"}
    assert set(data["growth"]) == {"promptswap", "promptswap-first-use", "one-at-a-time"}


def _http_available() -> bool:
    from benchmarks.promptswap_http import available

    return available()


def test_llama_cpp_systems_say_what_they_need_before_anything_runs(llama_dir, tmp_path, monkeypatch, capsys):
    from benchmarks import llama_cpp

    argv = ["--systems", "promptswap,llama.cpp-server", "--out", str(tmp_path), "--quiet"]
    assert main([*argv, "--model", str(llama_dir)]) == 2
    assert "use --model smollm2-135m-instruct" in capsys.readouterr().err
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llama_cpp, "CACHE", tmp_path / "empty-cache")
    assert main([*argv, "--model", "smollm2-135m-instruct"]) == 2
    assert "python -m benchmarks.llama_cpp build" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))  # nothing was measured
