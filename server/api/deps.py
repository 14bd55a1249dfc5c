"""Typed dependencies: what a route needs, taken from the app that create_app() built."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from prompt_store.registry import PromptRegistry
from server.api.metrics import Metrics
from server.config import Settings
from server.engine.errors import EngineStopped
from server.engine.loop import Engine


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine | None = request.app.state.engine
    if engine is None:  # the lifespan has not built it (requests are served only after startup)
        raise EngineStopped("the engine is not running")
    return engine


def get_registry(request: Request) -> PromptRegistry:
    registry: PromptRegistry | None = request.app.state.registry
    if registry is None:
        raise EngineStopped("the prompt registry is not loaded")
    return registry


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[PromptRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
