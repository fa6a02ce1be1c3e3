"""GET /health (the process serves HTTP), GET /ready (can serve inference), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from smolora.server.api.state import ServerState, get_state
from smolora.server.engine.protocol import EngineError
from smolora.server.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


async def engine_unhealthy(state: ServerState) -> str | None:
    """Why the engine cannot serve (its health probe failed or raised), or None when it can."""
    assert state.engine is not None
    if state.engine_failure is not None:
        return state.engine_failure
    try:
        health = await state.engine.health(detail=False)  # no worker round trip per probe
    except EngineError as e:
        return str(e)
    return None if health.ok else f"engine core unhealthy: {health.detail}"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the process is up and start-up has not failed; 503 once the engine is dead."""
    state = get_state(request)
    if state.startup_error:
        return JSONResponse({"status": "failed", "reason": state.startup_error}, status_code=503)
    if state.engine is not None:
        reason = await engine_unhealthy(state)
        if reason is not None:
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 when the engine is loaded and a checkpoint version is active (with adapters off: once the
    engine is up); 503 with the reason otherwise."""
    state = get_state(request)
    reason = state.not_ready_reason()
    if reason is None and state.engine is not None:
        unhealthy = await engine_unhealthy(state)
        if unhealthy is not None:
            reason = f"engine unhealthy: {unhealthy}"
    if reason is not None:
        return JSONResponse(
            {"status": "not_ready", "reason": reason},
            status_code=503,
            headers={"Retry-After": str(state.settings.retry_after_s)},
        )
    if state.versions is None:  # base-only serving
        return JSONResponse(
            {
                "status": "ready",
                "model": state.settings.served_model_name,
                "adapters": False,
                "active_version": None,
                "resident_versions": [],
            }
        )
    return JSONResponse(
        {
            "status": "ready",
            "model": state.settings.served_model_name,
            "adapters": True,
            "active_version": state.versions.active(),
            "resident_versions": [v.version for v in state.versions.resident()],
        }
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition: the app's `smolora_*` families, then, once the engine is up,
    vLLM's `vllm:*` engine families from the engine's own registry (`metrics_registry`)."""
    state = get_state(request)
    engine_registry = getattr(state.engine, "metrics_registry", None)
    return Response(state.metrics.render(engine_registry), media_type=CONTENT_TYPE)
