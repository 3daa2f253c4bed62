"""``/ws/unmix``: streaming, many tracks per connection (protocol in service.api.streaming)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket
from starlette.responses import JSONResponse

from service.api.deps import bearer_from_header, token_ok
from service.api.streaming import StreamSession

router = APIRouter()


async def _refuse(websocket: WebSocket, status: int, detail: str, headers=None) -> None:
    """Refuse the handshake with an HTTP status when the server supports it, else close."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"detail": detail}, status, headers=headers))
    else:
        await websocket.close(code=1008 if status == 401 else 1013, reason=detail)


@router.websocket("/ws/unmix")
async def ws_unmix(websocket: WebSocket) -> None:
    runtime = websocket.app.state.runtime
    header_token = bearer_from_header(websocket.headers.get("authorization"))
    if not token_ok(runtime, header_token, websocket.query_params.get("token")):
        runtime.metrics.errors.labels("unauthorized").inc()
        await _refuse(websocket, 401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})
        return
    if runtime.closing_streams or runtime.batcher is None:
        runtime.metrics.errors.labels("shutting_down").inc()
        await _refuse(websocket, 503, "the service is shutting down")
        return
    deadline_ms = websocket.query_params.get("deadline_ms")
    if deadline_ms is not None:
        try:
            deadline_ms = float(deadline_ms)
        except ValueError:
            deadline_ms = -1.0
        if not 0.0 <= deadline_ms <= 60_000.0:  # also refuses nan
            runtime.metrics.errors.labels("invalid_message").inc()
            await _refuse(websocket, 422, "query parameter deadline_ms: a number of ms in [0, 60000]")
            return
    await websocket.accept()
    await StreamSession(websocket, runtime, deadline_ms).run()
