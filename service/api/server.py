"""``csist serve`` / ``python -m service``: run the inference service with uvicorn.

Graceful shutdown: the first SIGTERM (or SIGINT) makes readiness answer 503 at once while the
service keeps serving for ``CSIST_DRAIN_S`` seconds (SIGTERM only: time for a load balancer
to stop routing here), then every WebSocket track is flushed and its socket closed with code
1001 and reason "server shutting down", then uvicorn stops listening, lets in-flight requests
finish, and the lifespan ends after the queued inference. A second signal forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from types import FrameType

import uvicorn

from service.api.app import create_app
from service.runtime.config import Settings
from service.runtime.lifecycle import Runtime
from service.runtime.logs import configure_logging

log = logging.getLogger("service.api.server")


class CsistServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or not self.started or self._loop is None:
            super().handle_exit(sig, frame)  # second signal, or not started: plain uvicorn
            return
        delay = self.runtime.settings.drain_s if sig == signal.SIGTERM else 0.0
        self._loop.call_soon_threadsafe(self._start_drain, delay)

    def _start_drain(self, delay: float) -> None:
        if self._drain_task is None:
            self._drain_task = self._loop.create_task(self._drain(delay))

    async def _drain(self, delay: float) -> None:
        try:
            await self.runtime.drain(delay)
        except Exception:
            log.exception("drain failed; shutting down anyway")
        finally:
            self.should_exit = True

    def request_shutdown(self, drain_s: float = 0.0) -> None:
        """Start the same shutdown as a signal does, from any thread (tests, embedding)."""
        if self._loop is None:
            self.should_exit = True
        else:
            self._loop.call_soon_threadsafe(self._start_drain, drain_s)


def build_server(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> CsistServer:
    """The app and its uvicorn server, configured from ``settings`` (not started)."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        # The hard cap of the WebSocket layer sits far above the service's own message limit,
        # so that a too-large message gets an error message rather than a dropped connection.
        ws_max_size=max(16 * settings.max_message_bytes, 1 << 20),
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or 1,
    )
    return CsistServer(config, app.state.runtime)


def exposure_problem(host: str, settings: Settings) -> str | None:
    """Why listening on ``host`` with these settings serves anyone who can reach it (None: it
    does not: loopback only, or a token is required)."""
    if settings.api_token is not None:
        return None
    try:
        if host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return f"listening on {host} without CSIST_API_TOKEN: anyone who can reach it may use the service"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csist serve",
        description="Run the CSIST unmixing service (FastAPI + ONNX Runtime). Other settings "
        "come from CSIST_* environment variables (see docs/configuration.md).",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument(
        "--model",
        default=None,
        help="model folder, holding its manifest.json (default: CSIST_MODEL_PATH, else models/derefnet)",
    )
    p.add_argument(
        "--log-level",
        default=None,
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default: CSIST_LOG_LEVEL, else info)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {}
    if args.model is not None:
        overrides["model_path"] = args.model
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    try:
        settings = Settings(**overrides)
    except Exception as exc:  # pydantic ValidationError: a bad CSIST_* variable
        print(f"csist serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    exposed = exposure_problem(args.host, settings)
    if exposed is not None:
        if settings.require_token:
            print(f"csist serve: {exposed}; CSIST_REQUIRE_TOKEN forbids that", file=sys.stderr)
            return 2
        log.warning(
            exposed + " (set CSIST_API_TOKEN, or CSIST_REQUIRE_TOKEN=1 to refuse this)", extra={"host": args.host}
        )
    server = build_server(settings, args.host, args.port)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits like this when start-up fails
        code = exc.code if isinstance(exc.code, int) else 1
        log.error("service did not start", extra={"exit_code": code})
        return code or 1
    except KeyboardInterrupt:
        return 0
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
