"""Smoke test of the named KV-memory workloads (benchmarks/memory.py) on the tiny model.

Each runs end to end at a tiny size; the checks are on the JSON's shape and on the engine's own
figures agreeing with the workload (pages, budgets, counters), never on wall-clock results.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.run import main
from server.engine.pages import PAGE_SIZE


def run_workload(llama_dir, tmp_path, name: str, *options: str) -> dict:
    argv = ["--workload", name, "--model", str(llama_dir), "--text-len", "3,12", "--out", str(tmp_path), "--quiet",
            *options]
    assert main(argv) == 0
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["workload"] == name
    assert data["command"] == "python -m benchmarks.run " + " ".join(argv)
    assert {"loadavg_before", "loadavg_after", "torch", "device"} <= set(data["environment"])
    assert data["spec"]["no_task_fraction"] == 0.0  # every request has a task
    new_tokens = data["description"]["max_new_tokens"]
    assert len(new_tokens) == data["spec"]["num_requests"]
    for system, summary in data["summaries"].items():
        assert summary["generated_tokens"] == sum(new_tokens), system  # ignore_eos: lengths are exact
        assert summary["tokens_per_s"] > 0
        assert [len(r["token_ids"]) for r in data["requests"][system]] == new_tokens
    for check in data["targets"].values():
        assert isinstance(check["met"], bool)
        assert isinstance(check["measured"], int | float) and isinstance(check["what"], str)
    for report in data["engine"].values():
        assert 1 <= report["end"]["peak_running"] <= data["settings"]["max_running"]
        assert report["fullest"]["running"] <= report["end"]["peak_running"]
        assert report["fullest"]["kv_pages_used"] <= report["fullest"]["kv_pages_total"]
        assert report["end"]["running"] == report["end"]["waiting"] == 0
    return data


def max_total_lens(data: dict) -> list[int]:
    d = data["description"]
    virtual = {name: t["num_virtual"] for name, t in d["tasks"].items()}
    tasks = [r["task"] for r in data["requests"]["promptswap"]]
    return [virtual[t] + text + new for t, text, new in zip(tasks, d["text_tokens"], d["max_new_tokens"], strict=True)]


def test_mixed_lengths(llama_dir, tmp_path):
    data = run_workload(llama_dir, tmp_path, "mixed-lengths", "--requests", "8", "--tasks", "2",
                        "--virtual-tokens", "2,8", "--max-new-tokens", "2,24", "--long-requests", "1",
                        "--old-rule-running", "3")
    assert set(data["summaries"]) == {"promptswap", "static-no-prompts"}
    assert set(data["ratios"]) == {"static-no-prompts"}
    long_ids = data["spec"]["long_request_ids"]
    assert len(long_ids) == 1
    assert [i for i, n in enumerate(data["description"]["max_new_tokens"]) if n == 24] == long_ids
    f = data["figures"]
    # The budget is the old rule's for 3 running, from the workload's own token counts.
    assert f["longest_max_total_len"] == max(max_total_lens(data))
    assert f["kv_cache_bytes"] == 3 * f["longest_max_total_len"] * f["bytes_per_position"]
    assert f["old_rule_running"] == 3
    engine = data["engine"]["promptswap"]
    assert engine["settings"] == {"kv_cache_bytes": f["kv_cache_bytes"]}
    assert engine["kv_budget_bytes"] == f["kv_cache_bytes"]
    assert engine["end"]["kv_pages_total"] == f["kv_cache_bytes"] // engine["page_bytes"] - 1  # less the null page
    assert engine["page_bytes"] == PAGE_SIZE * f["bytes_per_position"]
    assert f["peak_running"] == engine["end"]["peak_running"] <= 8
    assert data["targets"]["all_running"]["met"] == (f["peak_running"] == 8)
    ratio = data["ratios"]["static-no-prompts"]["tokens_per_s"]
    assert data["targets"]["tokens_per_s_ratio"] == {"what": ">= 3x static-no-prompts tokens/s", "measured": ratio,
                                                     "target": 3.0, "met": ratio >= 3.0}


def test_shared_prefix(llama_dir, tmp_path):
    data = run_workload(llama_dir, tmp_path, "shared-prefix", "--requests", "8", "--max-new-tokens", "4")
    assert set(data["summaries"]) == {"promptswap", "grouped-by-task"}
    (task,) = data["description"]["tasks"].values()
    assert task == {"kind": "prompt", "num_virtual": 64}  # the defaults: one soft prompt of 64 virtual tokens
    f = data["figures"]
    engine = data["engine"]["promptswap"]
    # The prefix is held once: its own pages, while requests run and (cached, idle) after.
    assert f["prefix_pages_expected"] == math.ceil(64 / PAGE_SIZE) == 4
    assert f["kv_pages_shared_fullest"] == engine["fullest"]["kv_pages_shared"] == 4
    # At the end only the prefix and the full pages the prefix cache keeps hold pages.
    assert engine["end"]["kv_pages_shared"] == engine["end"]["kv_pages_used"] - engine["end"]["kv_pages_cached"] == 4
    assert data["targets"]["prefix_held_once"]["met"] is True
    assert f["kv_bytes_in_use_fullest"] == engine["fullest"]["kv_pages_used"] * engine["page_bytes"]
    assert f["per_request_copy_bytes"] == sum(max_total_lens(data)) * f["bytes_per_position"]
    assert f["running_fullest"] == engine["fullest"]["running"] <= f["peak_running"] <= 8
    # Every running request's own pages, plus the prefix's once.
    if f["running_fullest"]:
        assert f["kv_pages_used_fullest"] >= 4 + f["running_fullest"]
    assert data["targets"]["below_copies"]["met"] == (f["kv_bytes_in_use_fullest"] < f["per_request_copy_bytes"])
    assert 0.0 <= f["agreement_promptswap_vs_grouped"] <= 1.0


def test_many_tasks(llama_dir, tmp_path):
    data = run_workload(llama_dir, tmp_path, "many-tasks", "--requests", "32", "--tasks", "40", "--cached-tasks", "2",
                        "--virtual-tokens", "2,40", "--max-new-tokens", "2")
    ours, theirs = "promptswap, 40 tasks", "promptswap, 16 tasks"
    assert set(data["summaries"]) == {ours, theirs}
    assert set(data["ratios"]) == {theirs}
    assert data["spec"]["compare_tasks"] == 16
    f = data["figures"]
    page_bytes = data["engine"][ours]["page_bytes"]
    assert f["prompt_cache_bytes"] >= page_bytes  # room for at least one idle prefix's page
    for name in (ours, theirs):
        assert data["engine"][name]["settings"] == {"prompt_cache_bytes": f["prompt_cache_bytes"]}
        assert data["engine"][name]["end"]["prompt_cache_budget_bytes"] == f["prompt_cache_bytes"]
        assert f[name]["preemptions"] == 0  # the default KV budget holds everything
        assert f[name]["prompt_cache_hits"] + f[name]["prompt_cache_misses"] == 32  # one prefix lookup per request
    # Over 40 tasks each request asks for a task of its own: every prefix is computed.
    assert f[ours]["tasks_asked"] == f[ours]["prompt_cache_misses"] == 32
    assert f[theirs]["tasks_asked"] == 16 <= f[theirs]["prompt_cache_misses"]
    assert data["targets"]["tokens_per_s_ratio"]["met"] == (data["ratios"][theirs]["tokens_per_s"] >= 0.8)


def test_shared_system_prompt(llama_dir, tmp_path):
    data = run_workload(llama_dir, tmp_path, "shared-system-prompt", "--requests", "12", "--tasks", "3",
                        "--instruction-tokens", "48", "--text-len", "3,12", "--max-new-tokens", "2")
    ours, theirs = "promptswap", "promptswap, no prefix caching"
    assert set(data["summaries"]) == {ours, theirs}
    f = data["figures"]
    assert f["tasks"] == 3 and f["instruction_tokens"] >= 48
    assert f["agreement_cached_vs_not"] == 1.0  # reading cached pages changes no token
    # 9 of the 12 requests read their task's instruction: at least its full pages each.
    assert f["prefix_cache_hits"] >= 9 * (f["instruction_tokens"] // 16) * 16
    assert f["prefix_cache_queries"] >= sum(data["description"]["text_tokens"])  # and the warm-up's texts
    assert data["engine"][theirs]["end"]["prefix_cache_queries"] == 0
    # The best any admission order could do: 6 requests (the median) need 2 instructions and 6 own texts.
    assert 1.0 < f["p50_ttft_better_bound"] < 6
    assert data["targets"]["tokens_per_s"]["met"] == (f["tokens_per_s_better"] >= 2.5)
    assert data["targets"]["ttft"]["met"] == (f["p50_ttft_better"] >= 0.9 * f["p50_ttft_better_bound"])


@pytest.mark.parametrize("argv", [["--workload", "shared-prefix", "--mode", "ttft"],
                                  ["--workload", "many-tasks", "--concurrency", "2,4"]])
def test_named_workload_refuses_other_modes(argv):
    with pytest.raises(SystemExit):
        main(argv)
