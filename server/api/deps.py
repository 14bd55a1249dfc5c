"""Typed dependencies: what a route needs, taken from the app that create_app() built."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.api.metrics import Metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request):
    return request.app.state.engine


def get_registry(request: Request):
    return request.app.state.registry


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[object, Depends(get_engine)]
RegistryDep = Annotated[object, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
