"""`promptswap serve` as a real process, for tests of signals, logs and crashes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve_process(model_dir, tmp_path, *flags: str, prompt_dir=None) -> tuple[subprocess.Popen, str]:
    """`promptswap serve` as its own process on a free port, once /health answers; (process, base URL).
    No model_dir: the offline demo."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSWAP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", *(["--model", str(model_dir)] if model_dir else []),
         "--port", str(port), "--prompt-dir", str(prompt_dir or tmp_path / "prompts"), *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server never became healthy"
        time.sleep(0.2)
