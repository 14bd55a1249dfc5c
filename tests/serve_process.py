"""`promptswap serve` as a real process, for tests of signals, logs and crashes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import COMPILE_ALL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve_process(model_dir, tmp_path, *flags: str, prompt_dir=None, env=None,
                        log_path=None) -> tuple[subprocess.Popen, str]:
    """`promptswap serve` as its own process on a free port, once /health answers; (process, base URL).
    No model_dir: the offline demo. With `--prompt-store` among the flags, no prompt directory. `log_path`:
    its output goes to that file (for long runs: an unread pipe would fill and block the server)."""
    proc, url = launch_serve_process(model_dir, tmp_path, *flags, prompt_dir=prompt_dir, env=env, log_path=log_path)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else Path(log_path).read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() >= deadline:
            proc.kill()  # not left serving after the test that started it has failed
            proc.wait(timeout=30)
            raise AssertionError("the server never became healthy")
        time.sleep(0.2)


def launch_serve_process(model_dir, tmp_path, *flags: str, prompt_dir=None, env=None,
                         log_path=None) -> tuple[subprocess.Popen, str]:
    """As start_serve_process, without waiting for anything: (process, base URL) at once."""
    port = _free_port()
    # A user's environment, not the suite's settings, but serving eagerly as the suite does (tests/conftest.py): a
    # server that compiled its step at start would take minutes on a cold kernel cache, the test's start timeout.
    suite = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSWAP_")}
    if not COMPILE_ALL:
        suite["PROMPTSWAP_COMPILE"] = "false"
    env = {**suite, **(env or {})}
    store = [] if "--prompt-store" in flags else ["--prompt-dir", str(prompt_dir or tmp_path / "prompts")]
    out = open(log_path, "w") if log_path else subprocess.PIPE  # noqa: SIM115 -- the process holds it
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.process.cli", "serve", *(["--model", str(model_dir)] if model_dir else []),
         "--port", str(port), *store, *flags],
        env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
    )
    return proc, f"http://127.0.0.1:{port}"
