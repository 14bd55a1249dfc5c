"""Smoke test of benchmarks/choices.py on the tiny model: it runs, and reports what it measured (no timing
is asserted: machines here are noisy)."""

from __future__ import annotations

from benchmarks.choices import CHOICES, measure


def test_the_choices_benchmark_runs_and_reports(llama_dir):
    result = measure(str(llama_dir), rounds=2)
    assert result["choices"] == len(CHOICES) == 8
    assert result["score_8_choices_median_s"] > 0 and result["generate_8_tokens_median_s"] > 0
    assert result["ratio"] > 0 and isinstance(result["met"], bool)
