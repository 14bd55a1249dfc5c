"""create_app(settings): the whole service is built here, and nothing at import time.

The lifespan loads the model, the registry and the engine at startup and drains the engine at
shutdown; routes reach them through `app.state` (see server/deps.py). `app.state.phase` says where it
stands: starting, ready, draining, or failed (the load failed).

By default the lifespan finishes loading before the server accepts a connection (tests, benchmarks,
another ASGI server). `promptswap serve` asks for `load_in_background`: the lifespan starts the load on a
thread and returns at once, so the port answers while the model loads (minutes for a big one, a GGUF
conversion on a first start): /health and /ready with 503 `starting`, the other endpoints with a 503
`starting_error` and Retry-After. A failed load is logged as one `cannot start:` line and reported to
`on_load_failure`, which ends the server.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.types import Scope

from prompt_store import InvalidDefaults, PromptRegistry, RegistryLimits
from prompt_store.backends import open_backend
from prompt_store.sync import StorePoller
from server.api.auth import AuthMiddleware
from server.api.docs import install_docs
from server.api.errors import UnexpectedErrorMiddleware, install_error_handler
from server.api.limits import BodyLimitMiddleware
from server.api.metrics import Metrics
from server.api.openapi import install_openapi
from server.api.request_id import RequestIdMiddleware
from server.api.routes import chat, generate, openai, ops, prompts, tokenize
from server.config import MiB, Settings
from server.engine.base_model import BaseModel
from server.engine.errors import InvalidParameter, ModelNotSupported
from server.engine.loop import Engine
from server.engine.sequence import SamplingParams
from server.model.model_loader import load_base_model
from server.model.model_source import model_source

log = logging.getLogger("promptswap")


def create_app(settings: Settings | None = None, *, load_in_background: bool = False,
               on_load_failure: Callable[[BaseException], object] | None = None) -> FastAPI:
    """The app. `load_in_background`: accept connections while the model loads (see the module's docstring);
    `on_load_failure(exc)` is then called, on the loading thread, if the load fails."""
    settings = settings or Settings()
    app = FastAPI(
        title="promptswap",
        summary="One frozen LLM, many tasks (soft prompts and prefixes), one batched forward pass.",
        lifespan=_lifespan,
        docs_url=None, redoc_url=None,  # served from packaged files instead of a CDN: install_docs
    )
    state = app.state
    state.settings = settings
    state.engine = None
    state.registry = None
    state.poller = None
    state.ready = False
    state.phase = "starting"
    state.load_error = None
    state.load_in_background = load_in_background
    state.on_load_failure = on_load_failure
    state.loader = None  # the loading thread, in the background mode
    state.lock = threading.Lock()  # the loading thread publishes, the shutdown closes: one after the other
    state.started_at = time.time()
    state.metrics = Metrics(
        engine_stats=lambda: state.engine.stats() if state.engine is not None else None,
        prompt_count=lambda: len(state.registry) if state.registry is not None else 0,
        store_poller=lambda: state.poller,
    )
    install_error_handler(app)
    install_openapi(app, settings)
    install_docs(app)
    for module in (ops, generate, prompts, openai, chat, tokenize):
        app.include_router(module.router)

    upload_limit = settings.max_prompt_bytes + MiB  # room for the multipart envelope and the config

    def limit_for(scope: Scope) -> int:
        return upload_limit if scope["path"].startswith("/prompts") else settings.max_request_bytes

    # The outermost (added last) runs first: any unexpected error becomes one clean 500; a declared
    # Content-Length over the limit is refused (413) before the token is checked (401), and both
    # before any byte of the body is read.
    app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, errors included, carries the id
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    settings: Settings = state.settings
    _warn_about_setup(settings)
    if state.load_in_background:
        # A daemon: a SIGTERM during a long load need not wait for it (serve exits without it).
        state.loader = threading.Thread(target=_load_in_background, args=(state,), name="promptswap-load",
                                        daemon=True)
        state.loader.start()
        log.info("loading the model; /health and /ready answer 503 (starting) until it is ready")
    else:
        # Loading takes seconds to minutes (a hub download): off the event loop.
        await run_in_threadpool(_load, state)
    try:
        yield
    finally:
        with state.lock:
            loading = state.phase == "starting"
            state.phase = "draining"  # before ready: /health never reads ready=False with phase "ready"
            state.ready = False  # /health answers 503 while draining
            engine, poller = state.engine, state.poller
        if poller is not None:
            poller.stop()
        if engine is not None:
            # uvicorn has already waited (up to the same timeout) for open responses to finish.
            await run_in_threadpool(engine.shutdown, settings.shutdown_timeout_s)
            log.info("engine stopped")
        elif loading:
            log.info("stopped before the model finished loading")


def _load(state: State) -> None:
    """Build the engine and publish it on `state` (ready); raises what loading raised, after logging it."""
    settings: Settings = state.settings
    try:
        base, registry, engine = _build_engine(settings)
    except (OSError, ValueError, ModelNotSupported) as exc:  # a bad model or prompt directory: the cause suffices
        log.error("cannot start: %s: %s", type(exc).__name__, exc)
        raise
    poller = None
    if settings.prompt_store is not None:  # shared with other replicas: follow it (and load it first)
        poller = StorePoller(registry, interval_s=settings.prompt_poll_interval_s,
                             full_sync_s=settings.prompt_full_sync_s)
        poller.start()
    with state.lock:
        stopped = state.phase != "starting"  # shut down while loading: nobody will serve this engine
        if not stopped:
            state.engine, state.registry, state.poller = engine, registry, poller
            state.phase = "ready"
            state.ready = True
    if stopped:
        if poller is not None:
            poller.stop()
        engine.shutdown(0)
        return
    log.info("promptswap ready: model %s (served as %r), %d prompts from %s%s", base.name, settings.model_name(),
             len(registry), registry.location, "" if poller is None else " (loading; /ready answers once loaded)")


def _load_in_background(state: State) -> None:
    try:
        _load(state)
    except BaseException as exc:
        if not isinstance(exc, (OSError, ValueError, ModelNotSupported)):  # unexpected: its traceback too
            log.error("cannot start: %s: %s", type(exc).__name__, exc, exc_info=exc)
        with state.lock:
            state.load_error = exc
            if state.phase == "starting":
                state.phase = "failed"
        if state.on_load_failure is not None:
            state.on_load_failure(exc)


def _build_engine(settings: Settings) -> tuple[BaseModel, PromptRegistry, Engine]:
    base = load_base_model(model_source(settings), device=settings.device, dtype=settings.dtype,
                           device_map=settings.device_map_value(), offload_dir=settings.offload_dir(),
                           quantize=settings.quantize, quantize_group_size=settings.quantize_group_size,
                           quantize_compute=settings.quantize_compute, onednn_linears=settings.cpu_linear == "onednn")
    limits = RegistryLimits(max_virtual_tokens=settings.max_virtual_tokens, max_bytes=settings.max_prompt_bytes)
    backend = open_backend(settings.prompt_store or settings.resolved_prompt_dir(),
                           endpoint_url=settings.s3_endpoint_url, timeout_s=settings.s3_timeout_s)
    registry = PromptRegistry(base.geometry, backend=backend, dtype=base.dtype, limits=limits,
                              base_model_names=served_model_names(settings, base),
                              strict_base_model=settings.strict_base_model, check_defaults=check_task_defaults)
    demo = settings.offline_demo()
    if settings.prompt_store is None:
        registry.load_all()
        if demo is not None and not settings.read_only_prompts:
            demo.register_tasks(registry, base)
    elif demo is not None:  # replicas would race to write them into the shared store
        log.info("the demo's built-in tasks are not added to the shared prompt store %s", registry.location)
    engine = Engine(base, registry, settings.engine_config())
    engine.start()
    return base, registry, engine


# A GGUF file name's quantization suffix: -Q4_K_M, .Q8_0, -IQ3_XS, .f16, -BF16 ...
_QUANT_SUFFIX = re.compile(r"[-._](?:I?Q\d\w*|[BF]F?16|F32)$", re.IGNORECASE)


def served_model_names(settings: Settings, base: BaseModel) -> list[str]:
    """Every name the served model goes by, for the adapters' recorded base model to be checked against:
    the served name, the model as configured (path, hub id or GGUF file), the loaded directory, its
    config's own name, and for a demo made from a hub model (SmolLM2) its hub id."""
    demo = settings.offline_demo()
    names = [settings.model_name(), base.name, getattr(base.model.config, "_name_or_path", "") or ""]
    if settings.model is not None and demo is None:
        names.append(settings.model)
    gguf = settings.gguf_path()
    if gguf is not None:  # Llama-3.2-1B-Instruct-Q4_K_M.gguf names itself and Llama-3.2-1B-Instruct
        names += [gguf.stem, _QUANT_SUFFIX.sub("", gguf.stem)]
    if demo is not None and demo.hub_id is not None:
        names.append(demo.hub_id)
    return [name for name in names if name]


def check_task_defaults(defaults: dict) -> None:
    """A task's generation defaults must be sampling parameters the engine takes (SamplingParams' ranges)."""
    try:
        SamplingParams(**defaults)
    except InvalidParameter as exc:
        raise InvalidDefaults(f"defaults.{exc.param} must be {exc.expected}, got {exc.actual!r}",
                              param=f"defaults.{exc.param}", expected=exc.expected, actual=exc.actual) from None


def _warn_about_setup(settings: Settings) -> None:
    if settings.admin_token is None:
        log.warning("no admin token: anyone who can reach this server can upload and delete prompts. "
                    "Set PROMPTSWAP_ADMIN_TOKEN (or --admin-token) outside development.")
    if settings.api_token is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API token and listening on %s: generation is open to the network", settings.host)
