"""service.engine.host: what the plans read of the CPU."""

import platform

import pytest
from numpy._core._multiarray_umath import __cpu_features__ as numpy_sees

from service.engine import host
from service.kernels import conv


@pytest.fixture(autouse=True)
def fresh_host_cache():
    host.cpu_info.cache_clear()
    host.cpu_flags.cache_clear()
    yield
    host.cpu_info.cache_clear()
    host.cpu_flags.cache_clear()


def test_the_kernels_view_of_the_cpu_wins_over_proc_cpuinfo(monkeypatch):
    # an AVX2-only CPU presented to the process (an emulator) on a host whose /proc/cpuinfo lists
    # AVX-512 VNNI: ONNX Runtime's int8 kernels read CPUID, so VNNI is not there for them
    monkeypatch.setattr(host, "cpu_info", lambda: ("Host CPU", frozenset({"avx2", "avx512f", "avx512_vnni"})))
    monkeypatch.setattr(conv, "cpu_flags", lambda: ("avx", "fma", "avx2"))
    assert host.cpu_flags() == {"avx", "fma", "avx2"}
    assert not host.has_vnni()
    assert host.isa() in ("avx2", "amx")  # amx only where the AMX kernels themselves said yes
    if not conv.AMX:
        assert host.isa() == "avx2"


def test_proc_cpuinfo_is_read_where_the_extension_cannot_tell(monkeypatch):
    monkeypatch.setattr(host, "cpu_info", lambda: ("Host CPU", frozenset({"avx2", "avx_vnni"})))
    monkeypatch.setattr(conv, "cpu_flags", lambda: None)
    assert host.cpu_flags() == {"avx2", "avx_vnni"}
    assert host.has_vnni()


@pytest.mark.skipif(platform.machine() != "x86_64" or not conv.BUILT, reason="needs the built extension on x86-64")
def test_cpuid_flags_agree_with_numpys_own_cpuid_reading():
    flags = conv.cpu_flags()
    assert flags is not None and len(set(flags)) == len(flags)
    known = {"avx", "fma", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
    assert set(flags) <= known | {"amx_tile", "amx_bf16", "amx_int8"}
    assert "avx2" in flags or "avx512f" not in flags  # every AVX-512 CPU has AVX2
    if conv.AMX:
        assert {"amx_tile", "amx_bf16"} <= set(flags)
    # numpy reads CPUID and XCR0 on its own: the same answer for the sets both name
    same = {"avx": "AVX", "fma": "FMA3", "avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW"}
    same["avx512_vnni"] = "AVX512VNNI"
    for ours, theirs in same.items():
        assert (ours in flags) == bool(numpy_sees.get(theirs)), ours
