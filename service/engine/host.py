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
    """(model name, flags) from /proc/cpuinfo; ("", {}) where it cannot be read. For what the
    kernels can use, :func:`cpu_flags`."""
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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction sets this process can use, as ONNX Runtime's kernels and the native
    kernels' dispatch see them: CPUID, where the OS saves their registers (``service.kernels.conv
    .cpu_flags``); /proc/cpuinfo's flags where the extension is not built. /proc/cpuinfo describes
    the host's CPU, and a process can be shown another: under an emulator such as qemu-user an
    AVX2-only CPU runs on a host whose /proc/cpuinfo lists AVX-512 VNNI, and the int8 kernels,
    which read CPUID, then saturate."""
    flags = conv.cpu_flags()
    return frozenset(flags) if flags is not None else cpu_info()[1]


def has_vnni() -> bool:
    """Whether ONNX Runtime's u8s8 int8 kernels can use VNNI (they saturate without it)."""
    return any(f in cpu_flags() for f in VNNI_FLAGS)


def isa() -> str:
    """The widest instruction set the plans' kernels can use here: amx, avx512, avx2 or baseline."""
    flags = cpu_flags()
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
