"""``POST /unmix``: frames of one track in, targets of every frame out."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError

from service.api.answers import deadline_s, peak_options, targets_payload, window_extras
from service.api.deps import RuntimeDep, require_token
from service.api.schemas import ErrorResponse, UnmixRequest, UnmixResponse
from service.engine.batcher import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown
from service.science.windows import sequence_slots, sequence_windows, split_segments

router = APIRouter(tags=["unmix"])

ERROR_RESPONSES = {
    401: {"model": ErrorResponse, "description": "API token required"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    503: {
        "model": ErrorResponse,
        "description": "overloaded, past the deadline (CSIST_DEADLINE_MS or"
        " options.deadline_ms) or shutting down; retry after Retry-After seconds",
    },
}


def frame_indices(body: UnmixRequest) -> list[int]:
    """The frames' indices: as given (on all frames), or 0, 1, 2, ... (on none).

    Raises RequestValidationError (422) naming the frame when only some frames have one, or
    when they do not increase.
    """
    given = [f.frame_index for f in body.frames]
    if all(i is None for i in given):
        return list(range(len(given)))
    missing = [k for k, i in enumerate(given) if i is None]
    if missing:
        k = missing[0]
        raise RequestValidationError(
            [
                {
                    "type": "missing",
                    "loc": ("body", "frames", k, "frame_index"),
                    "msg": "frame_index must be given on all frames or on none",
                }
            ]
        )
    try:
        split_segments(given)
    except ValueError as exc:
        k = next(k for k in range(1, len(given)) if given[k] <= given[k - 1])
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", "frames", k, "frame_index"),
                    "msg": f"frame_index must increase along the track: {exc}",
                }
            ]
        ) from None
    return given


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (its body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/unmix",
    response_model=UnmixResponse,
    responses=ERROR_RESPONSES,
    dependencies=[Depends(require_token)],
    summary="Unmix the targets of every frame of a short track",
)
async def unmix(body: UnmixRequest, runtime: RuntimeDep, request: Request) -> dict | Response:
    """Each frame t is answered from the window of frames t-2..t+2 (edges replicated; a
    frame_index gap, or a change of origin other than a re-centring step of whole pixels, starts
    a new segment; the frames of a re-centred patch are shifted into their window's middle
    patch), so 5 frames give 5 results and the middle one uses no padding. Coordinates: x =
    column, y = row, pixel centres at integers, origin at the patch's top-left pixel centre;
    sensor_x/sensor_y add the frame's origin.

    The windows must start inference within the deadline (``options.deadline_ms``, default
    ``CSIST_DEADLINE_MS``), else 503; a fit that would answer later is skipped (``refined``
    false). A client that disconnects before its answer has its queued windows dropped."""
    t0 = time.perf_counter()
    metrics = runtime.metrics
    indices = frame_indices(body)
    frames = np.asarray([f.patch for f in body.frames], dtype=np.float32)
    origins = [None if f.origin is None else (f.origin.x, f.origin.y) for f in body.frames]
    segments = split_segments(indices, origins)
    built = [sequence_windows(frames[s], origins[s]) for s in segments]
    windows = np.concatenate([w for w, _ in built])
    missing = np.concatenate([m for _, m in built])
    # One feature slot per distinct frame: with the streaming parts, each frame is encoded
    # once per request although it appears in up to 5 windows (a frame registered into a
    # re-centred window's patch shows other pixels and gets a slot of its own there).
    slots = [row for s in segments for row in sequence_slots(s.stop - s.start, origins[s])]
    options = peak_options(runtime, body.options)
    metrics.frames.labels("rest").inc(len(indices))
    owner = object()  # this request, for the batcher's cancel
    try:
        future = runtime.batcher.submit(
            windows, options, slots, deadline_s=deadline_s(runtime, body.options), owner=owner, missing=missing
        )
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if future not in done:  # nobody to answer: nothing more is computed for it
            runtime.batcher.cancel(owner)
            future.cancel()
            return Response(status_code=499)
        result = future.result()
    except DeadlineExceeded as exc:
        metrics.errors.labels("deadline_exceeded").inc()
        raise HTTPException(503, detail=f"deadline_exceeded: {exc}", headers={"Retry-After": "1"}) from None
    except Overloaded as exc:
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": "1"}) from None
    except ShuttingDown as exc:
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": "1"}) from None
    except InferenceFailed as exc:
        raise HTTPException(500, detail=str(exc)) from None
    metrics.windows.labels("rest").inc(len(indices))
    results = []
    n_targets = 0
    for k, (frame, index, peaks) in enumerate(zip(body.frames, indices, result.peaks, strict=True)):
        n_targets += len(peaks)
        spread, confidence = window_extras(result, k)
        results.append(
            {
                "frame_index": index,
                "timestamp": frame.timestamp,
                "targets": targets_payload(peaks, frame.origin, spread),
                "refined": result.refined,
                "count_confidence": confidence,
            }
        )
    metrics.targets.labels("rest").inc(n_targets)
    return {
        "track_id": body.track_id,
        "results": results,
        "model": runtime.model.metadata(),
        "timing_ms": {
            "queue": result.queue_s * 1000.0,
            "inference": result.inference_s * 1000.0,
            "postprocess": result.postprocess_s * 1000.0,
            "total": (time.perf_counter() - t0) * 1000.0,
        },
    }
