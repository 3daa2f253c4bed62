"""The application factory: ``create_app(settings)`` builds one independent service.

Everything stateful (metrics registry, model, batcher, streams) hangs off ``app.state.runtime``,
so several apps can live in one process (tests) without sharing anything.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.middleware import RequestMiddleware
from service.api.routes import health, models, unmix, ws
from service.modelpkg.model import ModelError
from service.runtime.config import Settings
from service.runtime.lifecycle import Runtime
from service.runtime.metrics import Metrics

log = logging.getLogger("service.api.app")

try:
    __version__ = version("csist-unmix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"

_FASTAPI_BODY_ERROR = "There was an error parsing the body"

DESCRIPTION = """\
Unmixing of closely-spaced infrared small targets with DeRefNet on ONNX Runtime.

* `POST /unmix`: 1 to 64 consecutive 11x11 frames of one track in, the targets of every frame
  out (each frame is answered from the 5-frame window around it; edges replicated).
* `WS /ws/unmix`: streaming, many tracks per connection; each frame is answered as soon as
  frame t+2 of its track arrived (protocol in docs/api.md).

Coordinates: x = column, y = row, in pixels, pixel centres at integers, origin at the centre
of the patch's top-left pixel; `sensor_x`/`sensor_y` add the frame's `origin`.
"""


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; the offending input is not echoed (it may be huge or NaN)."""
    detail = [
        {
            "loc": list(e.get("loc", ())),
            "msg": str(e.get("msg", "invalid")),
            "type": str(e.get("type", "value_error")),
        }
        for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI answers a body it cannot decode (e.g. not UTF-8) with a bare 400; make that the
    same 422 as any other malformed JSON body, so that every bad input gets 413 or 422."""
    if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_ERROR:
        return JSONResponse(
            {
                "detail": [
                    {
                        "loc": ["body"],
                        "msg": "body is not valid JSON text (UTF-8)",
                        "type": "json_invalid",
                    }
                ]
            },
            status_code=422,
        )
    return await http_exception_handler(request, exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A service app; the model is loaded (and verified) when the app starts, not here."""
    settings = settings if settings is not None else Settings()
    runtime = Runtime(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await runtime.start()
        except ModelError as exc:
            log.error("cannot serve the model: %s", exc, extra={"model": str(settings.model_path)})
            raise
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="csist-unmix",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.settings = settings
    app.add_middleware(RequestMiddleware)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for module in (unmix, ws, models, health):
        app.include_router(module.router)
    if settings.api_token is None:
        _without_auth_in_schema(app)
    return app


def _without_auth_in_schema(app: FastAPI) -> None:
    """Without a configured token the service asks for none: the OpenAPI schema then declares
    no security scheme, no ``token`` parameter and no 401 (schemathesis and clients read it)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema.get("components", {}).pop("securitySchemes", None)
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    op.pop("security", None)
                    op.get("responses", {}).pop("401", None)
                    if "parameters" in op:
                        op["parameters"] = [p for p in op["parameters"] if p.get("name") != "token"]
                        if not op["parameters"]:
                            del op["parameters"]
        return app.openapi_schema

    app.openapi = openapi
