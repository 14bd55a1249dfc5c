"""Smoke test of the soak workload (benchmarks/soak.py): a few requests end to end on its default model, the tiny
random-weight Llama preset built under --out, and the JSON's shape. Never a wall-clock or memory assertion: the
soak's figures are the benchmark's to measure, on a quiet machine."""

from __future__ import annotations

import json

from benchmarks.run import main
from benchmarks.soak import DEFAULTS, QUARTERS, draw_request
from benchmarks.workload import WorkloadSpec


def test_the_soak_runs_end_to_end_and_reports_each_quarter(tmp_path, capsys):
    argv = ["--workload", "soak", "--requests", "8", "--warmup-requests", "4", "--concurrency", "3",
            "--text-len", "1,6", "--max-new-tokens", "1,3", "--idle-s", "0", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "== soak: 8 requests, 3 clients, 5 tasks" in printed and "at rest (model loaded" in printed
    assert (tmp_path / "soak.png").stat().st_size > 0
    assert (tmp_path / "models" / DEFAULTS["model"] / "config.json").exists()  # the preset, built once
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["workload"] == "soak" and data["command"] == "python -m benchmarks.run " + " ".join(argv)
    assert data["spec"]["num_requests"] == 8 and data["settings"]["warmup_requests"] == 4
    assert data["settings"]["cpu_linear"] == "onednn" and data["settings"]["prefix_caching"] is True
    assert data["settings"]["kv_cache_bytes"] == DEFAULTS["kv_cache_bytes"]
    assert [q["quarter"] for q in data["quarters"]] == list(range(1, QUARTERS + 1))
    assert sum(q["requests"] for q in data["quarters"]) == 8
    for q in data["quarters"]:
        assert 0 < q["rss_min_mib"] <= q["rss_median_mib"] <= q["rss_max_mib"]
    assert all(v > 0 for v in data["rss_mib"].values())
    assert {r["answered"] for r in data["readings"]} >= {0, 8}
    assert isinstance(data["target"]["met"], bool) and data["generated_tokens"] >= 8
    assert data["engine"]["running"] == data["engine"]["waiting"] == 0


def test_each_request_is_drawn_from_the_seed_and_its_number():
    spec = WorkloadSpec(num_tasks=2, text_len=(1, 40), max_new_tokens=(1, 16), no_task_fraction=0.2, seed=5)

    class Tokenizer:
        def decode(self, ids):
            return " ".join(map(str, ids))

    draws = [draw_request(i, spec, ["a", "b"], list(range(100)), Tokenizer()) for i in range(400)]
    assert draws == [draw_request(i, spec, ["a", "b"], list(range(100)), Tokenizer()) for i in range(400)]
    assert {d.task for d in draws} == {"a", "b", None}
    assert {len(d.text.split()) for d in draws} == set(range(1, 41))  # every length of the range
    assert {d.max_new_tokens for d in draws} == set(range(1, 17))
    for shared in ("streamed", "sampled", "logprobs"):
        assert 0 < sum(getattr(d, shared) for d in draws) < 400, shared
    assert {d.samples for d in draws} == {1, 2}
