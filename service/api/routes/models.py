"""``GET /v2/models/{name}``: KServe V2 model metadata plus what is in use (providers, hash)."""

from __future__ import annotations

import onnxruntime as ort
from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse

from service.api.deps import RuntimeDep
from service.api.schemas import ErrorResponse, ModelMetadata, ReadyV2

router = APIRouter(tags=["models"])

_DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64"}


def _tensors(specs) -> list[dict]:
    """Card tensor specs in V2 form: symbolic dims (the batch axis) become -1."""
    return [
        {
            "name": s.name,
            "datatype": _DTYPES.get(s.dtype, s.dtype.upper()),
            "shape": [d if isinstance(d, int) else -1 for d in s.shape],
        }
        for s in specs
    ]


def _model_or_404(runtime, model_name: str):
    model = runtime.model
    if model is None or model_name != model.card.name:
        raise HTTPException(404, detail=f"unknown model {model_name!r}")
    return model


@router.get(
    "/v2/models/{model_name}",
    response_model=ModelMetadata,
    responses={404: {"model": ErrorResponse, "description": "no such model"}},
    summary="Model metadata (KServe V2), providers in use, hash and measured metrics",
)
async def model_metadata(model_name: str, runtime: RuntimeDep) -> dict:
    model = _model_or_404(runtime, model_name)
    card = model.card
    return {
        "name": card.name,
        "versions": [card.version],
        "platform": "onnxruntime_onnx",
        "inputs": _tensors(card.inputs),
        "outputs": _tensors(card.outputs),
        "sha256": model.sha256,
        "providers": model.providers,
        "requested_providers": model.requested_providers,
        "onnxruntime_version": ort.__version__,
        "physics": card.physics.model_dump(),
        "postprocess": card.postprocess.model_dump(),
        "metrics": card.metrics,
        "plan": runtime.selection.report() if runtime.selection is not None else {},
    }


@router.get(
    "/v2/models/{model_name}/ready",
    response_model=ReadyV2,
    responses={404: {"model": ErrorResponse}, 503: {"model": ReadyV2}},
    summary="KServe V2 model readiness",
)
async def model_ready(model_name: str, runtime: RuntimeDep):
    _model_or_404(runtime, model_name)
    if runtime.ready and not runtime.draining:
        return {"ready": True}
    return JSONResponse({"ready": False}, status_code=503)
