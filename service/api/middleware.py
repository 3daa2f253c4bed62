"""HTTP middleware (pure ASGI): request-body limit, request metrics and the access log.

The body limit is enforced here, before FastAPI parses JSON, so that an oversize body costs at
most ``max_request_bytes`` of memory and gets a 413 naming the limit: from the Content-Length
header when there is one, else while reading a chunked body.
"""

from __future__ import annotations

import logging
import re
import time

from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("service.access")

_BODY_METHODS = {"POST", "PUT", "PATCH"}
_QUIET_ROUTES = {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    422: "invalid_request",
    500: "internal",
    503: "unavailable",
}


def _templates(app) -> list[tuple[re.Pattern, str]]:
    """The app's HTTP path templates as regexes (from its OpenAPI), computed once per app."""
    cached = getattr(app.state, "_route_templates", None)
    if cached is None:
        cached = [(compile_path(p)[0], p) for p in app.openapi().get("paths", {})]
        app.state._route_templates = cached
    return cached


def route_label(scope: Scope) -> str:
    """The route template (``/v2/models/{model_name}``), never the raw path: bounded labels.

    Routing sets ``scope["route"]``; a request answered before routing (413) is matched
    against the app's path templates instead.
    """
    route = scope.get("route")
    if route is not None and isinstance(getattr(route, "path", None), str):
        return route.path
    app = scope.get("app")
    if app is not None:
        path = scope.get("path", "")
        for regex, template in _templates(app):
            if regex.match(path):
                return template
    return "unmatched"


def _replay_message(message: Message) -> Receive:
    """A receive callable that answers ``message`` forever (a client that left stays gone)."""

    async def receive() -> Message:
        return message

    return receive


class RequestMiddleware:
    """Limits request bodies, counts requests by route and status, logs each as JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        runtime = scope["app"].state.runtime
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            limit = runtime.settings.max_request_bytes
            limited = await self._limit_body(scope, receive, limit)
            if limited is None:
                response = JSONResponse({"detail": f"request body too large: the limit is {limit} bytes"}, 413)
                await response(scope, receive, send_wrapper)
            else:
                await self.app(scope, limited, send_wrapper)
        finally:
            self._record(scope, runtime, status, time.perf_counter() - t0)

    @staticmethod
    async def _limit_body(scope: Scope, receive: Receive, limit: int) -> Receive | None:
        """A receive that replays the (small enough) body, or None if the body is too large."""
        if scope["method"] not in _BODY_METHODS:
            return receive
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    return None
            except ValueError:
                pass  # let the server's HTTP parser / the app deal with a broken header
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnect: hand it on unchanged
                return _replay_message(message)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    def _record(scope: Scope, runtime, status: int, seconds: float) -> None:
        route = route_label(scope)
        metrics = runtime.metrics
        metrics.http_requests.labels(route, scope["method"], str(status)).inc()
        metrics.http_request_seconds.labels(route).observe(seconds)
        if status >= 400:
            metrics.errors.labels(ERROR_CODES.get(status, f"http_{status}")).inc()
        level = logging.DEBUG if route in _QUIET_ROUTES and status < 400 else logging.INFO
        if log.isEnabledFor(level):
            client = scope.get("client")
            log.log(
                level,
                "request",
                extra={
                    "method": scope["method"],
                    "route": route,
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round(seconds * 1000.0, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                },
            )
