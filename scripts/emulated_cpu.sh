#!/usr/bin/env bash
# Run the tests (or any Python command) with the process on an emulated CPU model, to check the
# code paths of a CPU this machine is not: e.g. an AVX2-only AMD EPYC (Zen 2) on an Intel Xeon
# with AVX-512 and AMX. qemu-user translates every instruction, so a test runs tens of times
# slower: pick the tests that depend on the instruction set.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'TXT'
usage: scripts/emulated_cpu.sh [--cpu MODEL] [--] [PYTEST ARGS ...]
       scripts/emulated_cpu.sh [--cpu MODEL] --python -c CODE | SCRIPT [ARGS ...]

Runs `.venv/bin/python -m pytest PYTEST ARGS` (default: the tests whose paths depend on the
instruction set: tests/service/kernels tests/service/engine tests/service/modelpkg), or with
--python the interpreter itself, under qemu-x86_64 with the CPU model MODEL (default EPYC-Rome:
AVX2 and FMA, no AVX-512, no VNNI, no AMX; `qemu-x86_64 -cpu help` lists the models; qemu 7.2
emulates AVX2 but not AVX-512). The process, ONNX Runtime and the native kernels' dispatch then
see that CPU through CPUID; /proc/cpuinfo still describes the host (service.engine.host reads
CPUID for that reason). Child processes (a uvicorn server started by a test) run natively.
Each test may take TIMEOUT seconds (default 3600; natively the suite allows 600). The default
tests take about half an hour on a 2-vCPU host.

Needs qemu-user (Debian: apt-get install qemu-user) and the virtual environment of `make test`.
TXT
}

cpu=EPYC-Rome
python_mode=0
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --cpu) cpu=${2:?--cpu needs a model name}; shift 2 ;;
    --python) python_mode=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found: apt-get install qemu-user" >&2; exit 2; }
[[ -x .venv/bin/python ]] || { echo ".venv/bin/python not found: run make test first" >&2; exit 2; }
models=$(qemu-x86_64 -cpu help | awk '{print $2}' || true)  # it exits 1 after listing
if ! grep -qx -- "$cpu" <<<"$models"; then
  echo "--cpu: qemu-x86_64 has no CPU model '$cpu' (qemu-x86_64 -cpu help lists them)" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[[ $python_mode == 1 || $# -gt 0 ]] || set -- tests/service/kernels tests/service/engine tests/service/modelpkg
# a test runs tens of times slower translated: the suite's 600 s per test becomes TIMEOUT (s)
[[ $python_mode == 1 ]] || set -- -m pytest -p no:cacheprovider -rs --timeout "${TIMEOUT:-3600}" "$@"
# TCG warns once per CPU feature it cannot emulate (pcid, x2apic, ...): not the command's output
exec qemu-x86_64 -cpu "$cpu" .venv/bin/python "$@" 2> >(grep -v "^qemu-x86_64: warning: TCG doesn't support" >&2)
