"""What the running service holds: settings, metrics, the model, the batcher, the streams.

One ``Runtime`` lives on ``app.state.runtime``. It is created with the app (so that the server
can reach it on SIGTERM) and filled in the lifespan (model loaded once, warmed, batcher
started). It also owns the shutdown sequence: not ready -> drain delay -> flush and close the
WebSocket streams -> finish queued inference.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from service.engine.batcher import Batcher
from service.engine.plans import PlanOptions
from service.engine.select import Selection, select_plan
from service.modelpkg.model import InferenceModel, resolve_providers
from service.runtime.config import Settings
from service.runtime.metrics import Metrics


class Stream(Protocol):
    """An open client stream (a WebSocket connection) that shutdown closes."""

    async def close(self, reason: str) -> None: ...


log = logging.getLogger("service.runtime.lifecycle")

CLOSE_REASON = "server shutting down"


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    model: InferenceModel | None = None
    selection: Selection | None = None  # the execution plan serving and how it was chosen
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False
    closing_streams: bool = False
    sessions: set[Stream] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)

    async def start(self) -> None:
        """Load and verify the model, warm it up, start the batcher; then report ready."""
        s = self.settings
        t0 = time.perf_counter()
        providers = resolve_providers(s.provider_list())
        workers, threads = s.parallelism(cuda="CUDAExecutionProvider" in providers)
        options = PlanOptions(tuple(providers), threads, s.ort_spinning, s.ort_graph_level, s.ort_arena)
        self.selection = await asyncio.to_thread(select_plan, s.model_path, options, s.plan, s.plan_budget_s)
        plan = self.selection.plan
        self.model = plan.model
        pairs = s.pair_cache and plan.pairs
        sizes = (1,) if s.max_batch_size == 1 else (1, s.max_batch_size)
        await asyncio.to_thread(self.model.warmup, sizes)
        self.batcher = Batcher(
            plan,
            self.metrics,
            max_batch=s.max_batch_size,
            max_wait_s=s.max_batch_wait_ms / 1000.0,
            max_queue=s.max_queue_windows,
            workers=workers,
            pairs=pairs,
            window_s=self._timed_window_s(),
        )
        self.batcher.start()
        card = self.model.card
        self.metrics.model.info(
            {
                "name": card.name,
                "version": card.version,
                "sha256": self.model.sha256,
                "providers": ",".join(self.model.providers),
                "plan": plan.name,
                "backends": ",".join(f"{k}={v}" for k, v in plan.backends().items()),
            }
        )
        # Everything loaded so far (the model, the sessions, the libraries' objects) lives as long
        # as the process: out of the collector's sight, a full collection no longer walks it. A
        # walk holds the GIL long enough to stall every worker and the event loop at once, which
        # shows as the latency tail.
        gc.collect()
        gc.freeze()
        self.ready = True
        self.metrics.ready.set(1)
        log.info(
            "model loaded and warmed",
            extra={
                "model": str(self.model.path),
                "model_name": card.name,
                "model_version": card.version,
                "sha256": self.model.sha256,
                "providers": self.model.providers,
                "plan": self.selection.report(),
                "pair_cache": pairs,
                "inference_workers": workers,
                "ort_threads": threads,
                "requested_providers": self.model.requested_providers,
                "load_ms": round((time.perf_counter() - t0) * 1000, 1),
            },
        )

    async def drain(self, delay_s: float) -> None:
        """SIGTERM: report not ready at once, keep serving ``delay_s`` (load balancers notice),
        then flush and close every stream."""
        if not self.draining:
            self.draining = True
            self.ready = False
            self.metrics.ready.set(0)
            log.info("draining: readiness now 503", extra={"drain_s": delay_s})
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        await self.close_streams()

    async def close_streams(self, reason: str = CLOSE_REASON) -> None:
        """Flush every open track of every WebSocket and close the sockets with ``reason``."""
        self.closing_streams = True
        sessions = list(self.sessions)
        if sessions:
            log.info("closing streams", extra={"connections": len(sessions)})
            await asyncio.wait_for(
                asyncio.gather(*(s.close(reason) for s in sessions), return_exceptions=True),
                self.settings.shutdown_timeout_s,
            )

    async def stop(self) -> None:
        """Lifespan end: no longer ready, streams closed, queued inference finished."""
        self.ready = False
        self.metrics.ready.set(0)
        try:
            await self.close_streams()
        except TimeoutError:
            log.warning("streams did not close in time")
        if self.batcher is not None:
            await self.batcher.stop()
        log.info("stopped")

    def _timed_window_s(self) -> float:
        """Seconds per window of the chosen plan as the choice timed it (0: not timed), the
        batcher's first estimate for admission before it has measured batches of its own."""
        row = next((r for r in self.selection.rows if r["plan"] == self.selection.plan.name), {})
        return row.get("ms_per_window", 0.0) / 1000.0
