"""Live servers over real HTTP: uvicorn in a background thread on 127.0.0.1, the real app, tiny models."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.config import Settings
from tests.peft_reference import PeftReference


class LiveServer:
    """create_app(settings) served by uvicorn on a free port, until stop()."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=10, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self._sock = sock

    def client(self, **kw) -> httpx.Client:
        kw.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kw)

    @property
    def engine(self):
        return self.app.state.engine

    @property
    def tokenizer(self):
        return self.app.state.engine.tokenizer

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self._sock.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(**settings) -> LiveServer; every server started is stopped at the end of the session."""
    servers: list[LiveServer] = []

    def start(**settings) -> LiveServer:
        settings.setdefault("cache_dir", tmp_path_factory.mktemp("cache"))
        settings.setdefault("prompt_dir", tmp_path_factory.mktemp("prompts"))
        server = LiveServer(Settings(**settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture(scope="module")
def llama_server(start_server, llama_dir):
    """One open server on the tiny Llama, shared by a module; tests use their own task names."""
    server = start_server(model=str(llama_dir), max_new_tokens_cap=1000, max_context=1024)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oa(llama_server):
    """The official openai client on the module's tiny-Llama server (no retries: a 5xx is a failure here)."""
    import openai

    return openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused", max_retries=0)


def _peft_configs():
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    causal = TaskType.CAUSAL_LM
    # A different n per method, so that a mix-up cannot pass unnoticed.
    return {
        "prompt_tuning": PromptTuningConfig(task_type=causal, num_virtual_tokens=5),
        "p_tuning": PromptEncoderConfig(task_type=causal, num_virtual_tokens=4, encoder_hidden_size=16),
        "prefix": PrefixTuningConfig(task_type=causal, num_virtual_tokens=3),
        "prefix_projection": PrefixTuningConfig(task_type=causal, num_virtual_tokens=6, prefix_projection=True,
                                                encoder_hidden_size=16),
    }


EXPECTED = {  # method -> (kind, num_virtual_tokens)
    "prompt_tuning": ("prompt", 5),
    "p_tuning": ("prompt", 4),
    "prefix": ("prefix", 3),
    "prefix_projection": ("prefix", 6),
}


@pytest.fixture(scope="session")
def adapters(llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Real PEFT adapter directories (get_peft_model + save_pretrained) on the tiny Llama, one per method."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, (method, config) in enumerate(_peft_configs().items()):
        torch.manual_seed(100 + seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(llama_dir)), copy.deepcopy(config))
        model.save_pretrained(str(root / method))
        out[method] = root / method
    return out


def scrape_metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """GET /metrics as {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def upload_multipart(client: httpx.Client, task: str, adapter_dir: Path, *, with_config: bool = True, **kw):
    files = {"weights": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes(),
                         "application/octet-stream")}
    if with_config:
        files["config"] = ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes(),
                           "application/json")
    return client.put(f"/prompts/{task}", files=files, **kw)


def upload_raw(client: httpx.Client, task: str, data: bytes, **kw):
    headers = {"content-type": "application/octet-stream", **kw.pop("headers", {})}
    return client.put(f"/prompts/{task}", content=data, headers=headers, **kw)


def iter_sse(response: httpx.Response):
    """(event name, data) of each server-sent event of a streamed response, as soon as it arrives."""
    name, data = None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield name, "\n".join(data)
            name, data = None, []
    if data:
        yield name, "\n".join(data)


def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    return list(iter_sse(response))


def stream_in_background(open_stream) -> tuple[list[dict], threading.Event, threading.Thread]:
    """Read a streamed response (`open_stream()` gives its context manager) in a thread, parsing each
    event's JSON. Returns (the events so far, an Event set at the first one, the started thread)."""
    events: list[dict] = []
    first = threading.Event()

    def read() -> None:
        with open_stream() as response:
            for _, data in iter_sse(response):
                events.append(json.loads(data))
                first.set()

    thread = threading.Thread(target=read)
    thread.start()
    return events, first, thread


@pytest.fixture(scope="session")
def reference_greedy(llama_dir):
    """greedy(adapter_dir or None, text, n): the shared PEFT reference on the tiny Llama."""
    return PeftReference(llama_dir).greedy


def invalid_status(path: str) -> int:
    """What an invalid request gets: OpenAI's 400 on /v1/*, promptswap's own 422 elsewhere."""
    return 400 if path.startswith("/v1/") else 422
