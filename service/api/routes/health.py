"""Liveness, readiness (also at the KServe V2 paths) and Prometheus metrics; never behind auth."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service.api.deps import RuntimeDep
from service.api.schemas import LiveV2, ReadyV2, Status
from service.runtime.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


def _readiness(runtime) -> tuple[bool, str | None]:
    if runtime.draining:
        return False, "draining"
    if not runtime.ready:
        return False, "loading"
    return True, None


@router.get("/healthz", response_model=Status, summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Status,
    responses={503: {"model": Status, "description": "not ready (loading or draining)"}},
    summary="Readiness: model loaded and warmed, not shutting down",
)
async def readyz(runtime: RuntimeDep):
    ok, reason = _readiness(runtime)
    if ok:
        return {"status": "ready"}
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


@router.get("/v2/health/live", response_model=LiveV2, summary="KServe V2 liveness")
async def v2_live() -> dict:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    response_model=ReadyV2,
    responses={503: {"model": ReadyV2, "description": "not ready"}},
    summary="KServe V2 readiness",
)
async def v2_ready(runtime: RuntimeDep):
    ok, _ = _readiness(runtime)
    if ok:
        return {"ready": True}
    return JSONResponse({"ready": False}, status_code=503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
    summary="Prometheus metrics",
)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)
