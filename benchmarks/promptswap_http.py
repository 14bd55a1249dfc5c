"""promptswap through its HTTP service: uvicorn in this process, concurrent streaming httpx clients.

The service is built by `server.app.create_app` exactly as `promptswap serve` builds it (it loads
its own copy of the model), the tasks are uploaded with PUT /prompts/{task}, and each request is
a streaming POST /generate sent at its arrival time; its first token is the first SSE event
carrying token ids.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.clients import free_port, replay
from benchmarks.metrics import RequestResult
from benchmarks.workload import Workload


def available() -> bool:
    """Whether this checkout has the HTTP service (and uvicorn/httpx to drive it)."""
    return all(importlib.util.find_spec(m) is not None for m in ("server.api.app", "uvicorn", "httpx"))


def run_http(model_path: str, device: str | None, dtype: str | None, workload: Workload, concurrency: int,
             max_tokens_per_step: int) -> list[RequestResult]:
    with tempfile.TemporaryDirectory(prefix="promptswap-bench-") as tmp, _serve(
        _settings(model_path, device, dtype, concurrency, max_tokens_per_step, Path(tmp), workload)
    ) as url:
        return asyncio.run(_clients(url, workload))


def _settings(model_path, device, dtype, concurrency, max_tokens_per_step, tmp: Path, workload: Workload):
    from server.config import Settings

    longest = max((t.num_virtual for t in workload.tasks.values()), default=1)
    return Settings(
        model=model_path, device=None if device in (None, "auto") else device,
        dtype=None if dtype in (None, "auto") else dtype, host="127.0.0.1", port=free_port(),
        prompt_dir=tmp / "prompts", cache_dir=tmp, max_running=concurrency,
        max_tokens_per_step=max_tokens_per_step, max_virtual_tokens=max(256, longest),
        max_new_tokens_cap=max(1024, max(r.max_new_tokens for r in workload.requests)),
        max_queue=max(1024, len(workload.requests)), log_level="warning",
    )  # fmt: skip


class _serve:
    """Context manager: uvicorn serving create_app(settings) in a thread; yields its base URL."""

    def __init__(self, settings) -> None:
        import uvicorn

        from server.api.app import create_app

        self.settings = settings
        config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                                log_level=settings.log_level, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 600  # loading a big model can take minutes
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP service did not start (see its log above)")
            time.sleep(0.05)
        return f"http://{self.settings.host}:{self.settings.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def _clients(url: str, workload: Workload) -> list[RequestResult]:
    import httpx

    limits = httpx.Limits(max_connections=len(workload.requests) + 4, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(None)) as client:
        for task in workload.tasks.values():
            r = await client.put(f"/prompts/{task.name}", params={"kind": task.kind}, content=task.to_safetensors(),
                                 headers={"content-type": "application/octet-stream"})
            r.raise_for_status()
        await _request(client, workload.requests[0].text, None, 2, time.perf_counter())  # warm
        return await replay(workload, lambda r, t0: _request(client, r.text, r.task, r.max_new_tokens, t0))


async def _request(client, text: str, task: str | None, max_new_tokens: int, t0: float):
    """One streaming POST /generate; returns (first token time, end time, token ids), relative to t0."""
    body = {"task": task, "text": text, "max_new_tokens": max_new_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    first, ids = None, []
    async with client.stream("POST", "/generate", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"POST /generate answered {response.status_code}: {response.text}")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                if event == "error":
                    raise RuntimeError(f"the stream reported an error: {data}")
                if data.get("token_ids"):
                    ids.extend(data["token_ids"])
                    if first is None:
                        first = time.perf_counter() - t0
                event = None
    done = time.perf_counter() - t0
    return (first if first is not None else done), done, ids
