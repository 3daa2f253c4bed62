"""Shared helpers of the benchmarks: simulated data, timing, machine description, output."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def simulated_trajectories(
    n: int, seed: int, noise: float = 0.0, targets: tuple[int, int] = (2, 4), frames: int = 20
) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """``n`` SeqCSIST-protocol trajectories exactly as ``csist simulate --seed SEED`` makes them.

    Trajectory i uses the i-th spawned generator of ``seed`` for both its motion and its noise,
    as ``training.simulate.generate`` does, so the test split of
    ``csist simulate --trajectories n --split 0,0,1 --seed SEED --noise X --targets LO-HI`` holds
    the same 8-bit images. Returns frames (n, T, 11, 11) float32 and targets [traj][frame] (K, 3).
    """
    from training.simulate import SimParams, render, simulate_trajectory, trajectory_rngs

    params = SimParams(noise=noise, targets=targets, frames=frames)
    params.validate()
    images, truth = [], []
    for rng in trajectory_rngs(seed, n):
        clean, tgt = simulate_trajectory(rng, params)
        images.append(render(clean, noise, rng, False).astype(np.float32))
        truth.append([np.asarray(t, dtype=np.float64) for t in tgt])
    return np.stack(images), truth


def time_per_call(fn: Callable[[], object], min_seconds: float, min_calls: int = 3, warmup: int = 2) -> float:
    """Seconds per call of ``fn``: warm up, then call it until ``min_seconds`` and ``min_calls``."""
    for _ in range(warmup):
        fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if calls >= min_calls and elapsed >= min_seconds:
            return elapsed / calls


def calls_per_second_parallel(fns: list[Callable[[], object]], min_seconds: float, warmup: int = 2) -> float:
    """Calls per second of all ``fns`` together, each called in a loop in its own thread."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    start = threading.Barrier(len(fns) + 1)
    stop = threading.Event()
    counts = [0] * len(fns)

    def loop(k: int) -> None:
        start.wait()
        while not stop.is_set():
            fns[k]()
            counts[k] += 1

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(len(fns))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(min_seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def machine() -> dict:
    """What the numbers ran on (CPU model, cores, versions)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def write_outputs(report: dict, out: Path | None, markdown_text: str, markdown: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(markdown_text)


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
