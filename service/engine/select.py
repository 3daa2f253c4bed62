"""Choosing the execution plan by measurement on the host that runs it.

``CSIST_PLAN=auto``: every plan eligible here (``plans.why_not``) is built, checked against the
float32 reference (ONNX Runtime's own kernels on the CPU: the stock plan's function) on a few
simulated windows, and timed round-robin within a bounded budget; the fastest that passes
serves, the others are released. ``CSIST_PLAN=<name>`` builds and checks that one plan alone.
Which kernels win differs between CPU families (a native kernel that wins with AVX-512 can lose
with AVX2), so flags alone do not decide.

An int8 model (its manifest has ``quantized_from``) is checked against the float32 model it was
quantized from when that model's folder is where the manifest says, with the hash it recorded:
ONNX Runtime's u8s8 int8 kernels saturate on x86 CPUs without VNNI and give wrong maps there,
which this check catches. Without the source the int8 model is refused on a CPU without VNNI.

:func:`select_plan` returns the plan and a report (one row per candidate) that the start-up
log, the ``csist_model_info`` metric, ``GET /v2/models/{name}`` and ``csist plans`` show.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.engine.host import has_vnni, host_summary
from service.engine.names import AUTO, PLANS, STOCK
from service.engine.plans import CPU, TOLERANCE, ExecutionPlan, PlanOptions, build_plan, why_not
from service.modelpkg.manifest import ModelPackage, PackageError, load_package
from service.modelpkg.model import ModelError
from service.science import physics
from service.science.windows import WINDOW

log = logging.getLogger("service.engine")

INT8_TOLERANCE = 0.1  # relative to the reference peak; a saturating kernel is off by far more
PROBE_SEED = 20261206
ROUNDS = 3  # round-robin timing rounds (median): a slow phase of a shared host hits every plan


@dataclass
class Selection:
    """The plan that serves and how it was chosen."""

    plan: ExecutionPlan
    requested: str
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def report(self) -> dict:
        return {
            "name": self.plan.name,
            "requested": self.requested,
            **self.plan.describe(),
            "selection_s": round(self.seconds, 2),
            "host": host_summary(),
            "candidates": self.rows,
        }


def probe_windows(n: int = 8, seed: int = PROBE_SEED) -> np.ndarray:
    """``n`` simulated 8-bit windows (n, 5, 11, 11): 2-4 targets of brightness 60-250 within a
    pixel of a point near the centre, moving a little per frame, on a pedestal with noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, WINDOW, physics.SIZE, physics.SIZE), np.float32)
    mid = (physics.SIZE - 1) / 2
    for i in range(n):
        k = int(rng.integers(2, 5))
        pos = mid + rng.uniform(-1.0, 1.0, (k, 2))
        velocity = rng.uniform(-0.1, 0.1, 2)
        brightness = rng.uniform(60, 250, k)
        pedestal = rng.uniform(0, 20)
        for t in range(WINDOW):
            targets = np.column_stack([pos + velocity * (t - WINDOW // 2), brightness])
            image = physics.pixel_response(targets) + pedestal + rng.normal(0, 1.0, (physics.SIZE,) * 2)
            out[i, t] = physics.quantize(image)
    return out


def time_plan(plan: ExecutionPlan, windows: np.ndarray, seconds: float) -> float:
    """Milliseconds per window of ``plan`` as a stream runs it (one new frame encoded and one
    window through the head per window; the single graph on whole windows otherwise)."""
    b = len(windows)
    if plan.streaming:
        frames = np.ascontiguousarray(windows[:, -1])
        feats = plan.encode(windows.reshape(b * WINDOW, *windows.shape[2:])).reshape(b, WINDOW, -1)

        def call():
            plan.encode(frames)
            plan.head(feats)
    else:

        def call():
            plan.run(windows)

    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        call()
        calls += 1
    return (time.perf_counter() - t0) / calls / b * 1000.0


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest value; inf on NaN."""
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.abs(got - want).max() / (np.abs(want).max() or 1.0))


def _package(model_path: Path) -> ModelPackage:
    try:
        return load_package(model_path)
    except PackageError as exc:
        raise ModelError(str(exc)) from None


def _int8_source(package: ModelPackage) -> Path | None:
    """The folder of the float32 model an int8 one was quantized from, when it is where the
    manifest says and holds that model (the single graph's hash it recorded)."""
    source = package.manifest.quantized_from
    if source is None:
        return None
    try:
        found = load_package(package.directory / source.package)
    except PackageError:
        return None
    return found.directory if found.sha256 == source.sha256.lower() else None


def _reference(
    model_path: Path, package: ModelPackage, options: PlanOptions, windows: np.ndarray, stock: ExecutionPlan | None
) -> tuple[np.ndarray, str, float]:
    """Reference maps, what they come from, and the tolerance of this model's plans."""
    cpu = PlanOptions((CPU,), options.threads, options.spinning, options.graph_level, options.arena)
    if package.manifest.quantized_from is not None:
        source = _int8_source(package)
        if source is None:
            if not has_vnni():
                raise ModelError(
                    "this int8 model needs a CPU with VNNI (AVX-512 VNNI or AVX-VNNI): without it ONNX Runtime's "
                    "int8 kernels saturate and give wrong maps; serve the float32 model (models/derefnet)"
                )
            why = "none (int8 without its float32 source where its manifest says; the CPU has VNNI)"
            return None, why, INT8_TOLERANCE
        ref = build_plan(STOCK, source, options=cpu)
        return ref.run(windows), f"{source.name} on {CPU}", INT8_TOLERANCE
    if stock is not None and stock.model.providers[:1] == [CPU]:
        ref = stock
    else:
        name = STOCK if {"encoder", "head"} <= set(package.parts) else "onnxruntime-single"
        ref = build_plan(name, model_path, options=cpu)
    return ref.run(windows), f"{package.directory.name} ({ref.name}) on {CPU}", 0.0


def select_plan(
    model_path: str | Path,
    options: PlanOptions = PlanOptions(),
    requested: str = AUTO,
    budget_s: float = 6.0,
    probe: int = 8,
) -> Selection:
    """Build, check and (for ``auto``) time the candidate plans; the chosen one is returned.

    ModelError when the requested plan cannot run here, or when no candidate gives the
    reference's maps (the message names each plan's reason).
    """
    t0 = time.perf_counter()
    model_path = Path(model_path)
    package = _package(model_path)
    if requested != AUTO and requested not in PLANS:
        raise ModelError(f"plan={requested!r} is not one of {', '.join((AUTO, *PLANS))}")
    names = (
        [requested]
        if requested != AUTO
        else [n for n in PLANS if n != "onnxruntime-single" or not {"encoder", "head"} <= set(package.parts)]
    )
    windows = probe_windows(probe)
    rows: dict[str, dict] = {}
    built: dict[str, ExecutionPlan] = {}
    for name in names:
        reason = why_not(name, package, options)
        if reason is not None:
            if requested != AUTO:
                raise ModelError(f"plan={name!r} cannot be used here: {reason}")
            rows[name] = {"plan": name, "status": "not eligible", "reason": reason}
            continue
        try:
            built[name] = build_plan(name, model_path, options)
        except ModelError as exc:
            if requested != AUTO:
                raise
            rows[name] = {"plan": name, "status": "not loaded", "reason": str(exc)}
    want, reference, int8_tol = _reference(model_path, package, options, windows, built.get(STOCK))
    for name, plan in list(built.items()):
        tolerance = int8_tol or TOLERANCE[plan.precision]
        row = rows[name] = {
            "plan": name,
            "precision": plan.precision,
            "backends": plan.backends(),
            "tolerance": tolerance,
        }
        if want is None:
            row["max_rel_error"] = None
            continue
        try:
            err = relative_error(plan.run(windows), want)
        except Exception as exc:  # a kernel failing on this host disqualifies its plan, not the service
            err, row["reason"] = float("inf"), f"failed on the probe windows: {exc}"
        row["max_rel_error"] = err
        if not err <= tolerance:
            row.update(
                status="failed check",
                reason=row.get("reason")
                or f"maps differ from the reference by {err:.3g} of its peak (> {tolerance:g})",
            )
            del built[name]
    if not built:
        why = "; ".join(f"{r['plan']}: {r.get('reason', r.get('status'))}" for r in rows.values())
        raise ModelError(f"no execution plan gives correct maps on this host ({why})")
    timings: dict[str, list[float]] = {name: [] for name in built}
    if len(built) > 1:
        share = max(budget_s - (time.perf_counter() - t0), 0.5) / (len(built) * ROUNDS)
        for _ in range(ROUNDS):
            for name, plan in built.items():
                timings[name].append(time_plan(plan, windows, share))
    for name, samples in timings.items():
        rows[name]["status"] = "passed"
        if samples:
            ms = statistics.median(samples)
            rows[name].update(ms_per_window=round(ms, 3), windows_per_s_per_worker=round(1000.0 / ms, 1))
    chosen = min(built, key=lambda n: statistics.median(timings[n]) if timings[n] else 0.0)
    rows[chosen]["status"] = "chosen"
    for row in rows.values():
        row.setdefault("reference", reference)
    order = {n: i for i, n in enumerate(PLANS)}
    selection = Selection(
        built[chosen], requested, sorted(rows.values(), key=lambda r: order[r["plan"]]), time.perf_counter() - t0
    )
    built.clear()  # the plans not chosen, and their sessions, go now
    return selection


def table(report: dict) -> str:
    """The candidates as a markdown table (``csist plans``, the README)."""
    lines = ["| plan | status | ms / window (1 thread) | max rel. error | backends / reason |", "|---|---|---|---|---|"]
    for r in report["candidates"]:
        err = r.get("max_rel_error")
        what = r.get("reason") or ", ".join(f"{k}: {v}" for k, v in (r.get("backends") or {}).items())
        lines.append(
            f"| {r['plan']} | {r['status']} | {r.get('ms_per_window', '-')} | "
            f"{'-' if err is None else f'{err:.2e}'} | {what} |"
        )
    return "\n".join(lines)
