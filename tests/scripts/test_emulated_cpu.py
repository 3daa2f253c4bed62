"""scripts/emulated_cpu.sh: the process on an emulated CPU sees that CPU, not the host's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "emulated_cpu.sh"
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-x86_64") is None or not (ROOT / ".venv" / "bin" / "python").exists(),
    reason="qemu-x86_64 (Debian: qemu-user) and the project's .venv are needed",
)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_names_what_it_needs():
    out = run("--help")
    assert out.returncode == 0
    assert "usage: scripts/emulated_cpu.sh" in out.stdout and "qemu-user" in out.stdout


@needs_qemu
def test_an_unknown_cpu_model_is_refused_naming_the_flag():
    out = run("--cpu", "NoSuchCPU", "--python", "-c", "pass")
    assert out.returncode == 2
    assert "--cpu" in out.stderr and "NoSuchCPU" in out.stderr


@needs_qemu
def test_an_avx2_only_cpu_gets_no_vnni_and_no_amx_whatever_the_host():
    # the plans and the int8 guard must see the CPU the kernels see (CPUID), not the host's
    # /proc/cpuinfo: here an AMD EPYC of the Zen 2 generation, on whatever this host is
    code = "from service.engine import host; print(host.isa(), host.has_vnni(), sorted(host.cpu_flags()))"
    out = run("--cpu", "EPYC-Rome", "--python", "-c", code)
    assert out.returncode == 0, out.stderr
    isa, vnni, flags = out.stdout.split(maxsplit=2)
    assert (isa, vnni) == ("avx2", "False")
    assert "avx512f" not in flags and "amx_tile" not in flags and "'avx2'" in flags
