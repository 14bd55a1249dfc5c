"""Smoke test of benchmarks/precision.py on the tiny model: every mode runs, float32 agrees with itself, and the
JSON holds speedups and agreement rates (no timing is asserted: machines here are noisy)."""

from __future__ import annotations

import json

from benchmarks.precision import GGUF_MODES, MODES, agreement, main


def test_agreement_counts_whole_sequences_and_tokens_before_the_first_difference():
    ref = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 9)]
    got = [(1, 2, 3, 4), (5, 6, 0, 8), (9, 9, 2)]  # the last one ran on past the reference's end
    result = agreement(ref, got)
    assert result["same_sequences"] == 1 / 3 and result["requests"] == 3
    assert result["tokens_before_divergence"] == (1 + 2 / 4 + 2 / 3) / 3


def test_the_precision_benchmark_runs_every_mode_and_reports(llama_dir, tmp_path, capsys):
    modes = [m for m in MODES if m not in GGUF_MODES]  # the tiny llama was not converted from a GGUF file
    out = tmp_path / "precision.json"
    assert main(["--model", str(llama_dir), "--modes", ",".join(modes), "--requests", "4", "--tasks", "2",
                 "--virtual-tokens", "2,4", "--text-len", "4,8", "--max-new-tokens", "3", "--concurrency", "1,2",
                 "--c1-requests", "2", "--repeats", "2", "--json", str(out), "--quiet"]) == 0
    payload = json.loads(out.read_text())
    assert list(payload["modes"]) == modes and payload["chat"] is None  # chat questions: real demo weights only
    reference = payload["modes"]["float32"]
    assert reference["speedup"] == 1.0 and reference["agreement"]["same_sequences"] == 1.0
    assert reference["self_agreement"] == 1.0 and reference["weight_share"] == 1.0
    for mode in modes:
        row = payload["modes"][mode]
        assert set(row["by_concurrency"]) == {"1", "2"}
        assert all(at["tokens_per_s"] > 0 and at["speedup"] > 0 for at in row["by_concurrency"].values())
        assert row["weight_bytes"] > 0
        assert 0 <= row["agreement"]["same_sequences"] <= row["agreement"]["tokens_before_divergence"] <= 1
        assert set(row["agreement_by_kind"]) <= {"no task", "soft prompt", "prefix"}
    for mode in ("int8-weight-only", "int4-weight-only"):  # quantized weights take less room than float32's
        assert payload["modes"][mode]["weight_share"] < 0.5
    assert payload["modes"]["int4-weight-only"]["weight_bytes"] < payload["modes"]["int8-weight-only"]["weight_bytes"]
    assert "float32" in capsys.readouterr().out
