"""SIGKILL during and right after an upload, on a real server process: after a restart on the same
prompt directory the task holds the old version or the new one, whole; nothing is listed as failed;
the leftovers of the interrupted write are removed at start."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import httpx
import torch
from safetensors.torch import save

from prompt_store.format import TEMP_PREFIX, tensor_sha256
from tests.serve_process import start_serve_process

ROWS = 30_000  # x 64 wide x 4 bytes: a ~7.7 MB upload, long enough to be killed in every phase
CHUNK = 1 << 20
FLAGS = ("--max-virtual-tokens", str(ROWS), "--max-prompt-bytes", str(64 << 20), "--log-level", "warning")


def _file(tensor: torch.Tensor) -> bytes:
    return save({"prompt_embeddings": tensor.contiguous()}, metadata={"kind": "prompt"})


def _upload_in_background(url: str, data: bytes, sent_half: threading.Event, sent_all: threading.Event):
    def body():
        for start in range(0, len(data), CHUNK):
            if start >= len(data) // 2:
                sent_half.set()
            yield data[start:start + CHUNK]
        sent_all.set()

    def put() -> None:
        with contextlib.suppress(httpx.TransportError):  # the server is killed meanwhile: expected
            httpx.put(f"{url}/prompts/victim", content=body(), timeout=120,
                      headers={"content-type": "application/octet-stream", "content-length": str(len(data))})

    thread = threading.Thread(target=put)
    thread.start()
    return thread


# Killed while the body arrives, as it is validated, while it is written and fsynced, and once acknowledged.
MOMENTS = ["mid-body", "body-sent", "body-sent+30ms", "body-sent+100ms", "after-201"]


def _put(url: str, task: str, data: bytes) -> httpx.Response:
    return httpx.put(f"{url}/prompts/{task}", content=data, timeout=120,
                     headers={"content-type": "application/octet-stream"})


def test_sigkill_leaves_the_old_or_the_new_version_whole(llama_dir, tmp_path):
    # One chain of kills and restarts on one prompt directory: each restart is the next kill's server.
    prompt_dir = tmp_path / "prompts"
    current = torch.randn(2, 64)
    proc, url = start_serve_process(llama_dir, tmp_path, *FLAGS, prompt_dir=prompt_dir)
    try:
        for task in ("bystander", "victim"):
            r = _put(url, task, _file(current))
            assert r.status_code == 201, r.text
        version = r.json()["version"]
        for moment in MOMENTS:
            new = torch.randn(ROWS, 64)
            if moment == "after-201":
                r = _put(url, "victim", _file(new))
                assert r.status_code == 200, r.text
            else:
                sent_half, sent_all = threading.Event(), threading.Event()
                uploader = _upload_in_background(url, _file(new), sent_half, sent_all)
                assert (sent_half if moment == "mid-body" else sent_all).wait(60)
                if "+" in moment:
                    time.sleep(int(moment.split("+")[1].removesuffix("ms")) / 1000)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            if moment != "after-201":
                uploader.join(60)

            proc, url = start_serve_process(llama_dir, tmp_path, *FLAGS, prompt_dir=prompt_dir)
            assert not [p.name for p in prompt_dir.iterdir() if p.name.startswith(TEMP_PREFIX)], moment
            listed = httpx.get(f"{url}/prompts", timeout=30).json()["prompts"]
            assert [(d["task"], d["error"]) for d in listed] == [("bystander", None), ("victim", None)], moment
            victim = listed[1]
            assert victim["sha256"] in (tensor_sha256(current), tensor_sha256(new)), moment
            if moment == "after-201":
                assert victim["sha256"] == tensor_sha256(new)  # acknowledged means durable
            if victim["sha256"] == tensor_sha256(new):
                assert victim["version"] > version and victim["num_virtual_tokens"] == ROWS, moment
                current, version = new, victim["version"]
            else:
                assert victim["version"] == version, moment
            r = httpx.post(f"{url}/generate", json={"task": "bystander", "text": "still served",
                                                    "max_new_tokens": 2}, timeout=60)
            assert r.status_code == 200, moment
    finally:
        proc.kill()
        proc.wait()
