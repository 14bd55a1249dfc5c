"""Typed dependencies: what a route needs, taken from the app that create_app() built."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from prompt_store.registry import PromptRegistry
from server.api.errors import ServerStarting
from server.api.metrics import Metrics
from server.config import Settings
from server.engine.errors import EngineStopped
from server.engine.loop import Engine


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine | None = request.app.state.engine
    if engine is None:  # still loading (`promptswap serve` listens meanwhile), or it never loaded
        raise _not_yet(request, "the engine is not running")
    return engine


def get_registry(request: Request) -> PromptRegistry:
    registry: PromptRegistry | None = request.app.state.registry
    if registry is None:
        raise _not_yet(request, "the prompt registry is not loaded")
    return registry


def _not_yet(request: Request, stopped: str) -> Exception:
    return ServerStarting() if getattr(request.app.state, "phase", None) == "starting" else EngineStopped(stopped)


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[PromptRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
