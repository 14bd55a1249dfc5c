"""Health and metrics: open without tokens, so load balancers and Prometheus can reach them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.deps import MetricsDep
from server.api.json_body import JsonRoute
from server.api.schemas import Health, Readiness

router = APIRouter(tags=["ops"], route_class=JsonRoute)


@router.get("/health", response_model=Health,
            responses={503: {"model": Health, "description": "Starting or draining"}})
def health(request: Request) -> Response:
    """200 once the model is loaded and the engine runs; 503 while starting (the port answers while the model
    loads), draining or after a failed load, with the `reason`."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is None or not state.ready:
        return JSONResponse({"status": "unavailable", "reason": _unavailable(state)}, status_code=503)
    return JSONResponse({"status": "ok", "model": state.settings.model_name(), "prompts": len(state.registry),
                         "demo": state.settings.demo})


@router.get("/ready", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Starting, loading the prompt store, or draining"}})
def ready(request: Request) -> Response:
    """Readiness, for a load balancer: 200 once the model is loaded and every stored task has been loaded
    once (with an object store, the first full listing); 503 before that and while draining. /health
    stays the liveness check."""
    state = request.app.state
    registry = getattr(state, "registry", None)
    if getattr(state, "engine", None) is None or not state.ready:
        return JSONResponse({"status": "unavailable", "reason": _unavailable(state)}, status_code=503)
    if registry is None or not registry.synced:
        return JSONResponse({"status": "unavailable", "reason": f"loading the prompt store {registry.location}"
                             if registry is not None else "starting"}, status_code=503)
    return JSONResponse({"status": "ok", "prompts": len(registry)})


def _unavailable(state) -> str:
    """starting, draining or failed (server/api/app.py sets the phase); "ready" only for an instant while it
    publishes the engine, which is still starting."""
    phase = getattr(state, "phase", "starting")
    return "starting" if phase == "ready" else phase


# The exposition format follows the Accept header: Prometheus text, or OpenMetrics when asked for.
_METRICS_MEDIA = {"text/plain": {"schema": {"type": "string"}},
                  "application/openmetrics-text": {"schema": {"type": "string"}}}


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus metrics", "content": _METRICS_MEDIA}})
def metrics(request: Request, metrics: MetricsDep) -> Response:
    content, content_type = metrics.render(request.headers.get("accept"))
    return Response(content, media_type=content_type)
