"""llama.cpp's server in the benchmark, on the demo's GGUF, where it was built (`python -m benchmarks.llama_cpp
build`: ~10-20 minutes, so never in CI, where this is skipped). No wall-clock assertions."""

from __future__ import annotations

import json

import pytest

from benchmarks import llama_cpp
from benchmarks.run import main


def test_llama_cpp_server_serves_the_workload_beside_promptswap(smollm2_cache, tmp_path):
    try:
        llama_cpp.binary()
    except llama_cpp.LlamaCppMissing as e:
        pytest.skip(str(e))
    systems = ["promptswap-no-prompts", "llama.cpp-server"]
    argv = ["--model", "smollm2-135m-instruct", "--requests", "6", "--tasks", "2", "--concurrency", "1,3",
            "--max-new-tokens", "4", "--text-len", "8,24", "--systems", ",".join(systems), "--out", str(smollm2_cache),
            "--quiet"]
    assert main(argv) == 0
    data = json.loads((smollm2_cache / "throughput.json").read_text())
    for c in ("1", "3"):
        block = data["by_concurrency"][c]
        assert set(block["summaries"]) == set(systems)
        for s in block["summaries"].values():
            assert s["generated_tokens"] == 6 * 4  # ignore_eos: exactly n_predict each
        # Another engine on Q4_1 kernels: a rate, reported, not required to be 1.
        assert 0.0 <= block["agreement"]["llama.cpp-server vs promptswap-no-prompts"] <= 1.0
    for r in data["requests"]["3"]["llama.cpp-server"]:
        assert r["first_token_s"] <= r["finish_s"]
