"""What the host offers that the plans care about: CPU model and instruction-set flags, GPUs."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import onnxruntime as ort

from service.kernels import conv
from service.runtime.config import available_cpus

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; ("", {}) where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor(), frozenset()
    name, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return name, flags


def has_vnni() -> bool:
    """Whether ONNX Runtime's u8s8 int8 kernels can use VNNI (they saturate without it)."""
    return any(f in cpu_info()[1] for f in VNNI_FLAGS)


def isa() -> str:
    """The widest instruction set the plans' kernels can use here: amx, avx512, avx2 or baseline."""
    flags = cpu_info()[1]
    if conv.AMX:
        return "amx"
    if "avx512f" in flags:
        return "avx512" + ("-vnni" if "avx512_vnni" in flags else "")
    if "avx2" in flags:
        return "avx2" + ("-vnni" if "avx_vnni" in flags else "")
    return "baseline"


def host_summary() -> dict:
    return {
        "cpu": cpu_info()[0] or platform.machine(),
        "isa": isa(),
        "cpus": available_cpus(),
        "providers": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
    }
