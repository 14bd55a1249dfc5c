"""Health and metrics: open without tokens, so load balancers and Prometheus can reach them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.deps import MetricsDep

router = APIRouter(tags=["ops"])


@router.get("/health")
def health(request: Request) -> Response:
    """200 once the model is loaded and the engine runs; 503 while starting or draining."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is None or not state.ready:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok", "model": state.settings.model_name(), "prompts": len(state.registry),
                         "demo": state.settings.demo})


@router.get("/metrics")
def metrics(request: Request, metrics: MetricsDep) -> Response:
    content, content_type = metrics.render(request.headers.get("accept"))
    return Response(content, media_type=content_type)
