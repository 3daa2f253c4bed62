#!/usr/bin/env bash
# One command for a lent GPU machine: install the gpu extra, run the CUDA tests, the plan table and
# the speed benchmark through the real server (auto plan beside the stock plan), print one table.
#
#   bash bench/gpu.sh [OUT_DIR]        # OUT_DIR default: bench/results/gpu
#
# Needs Python 3.11, an NVIDIA driver and the package registry (onnxruntime-gpu and its CUDA
# libraries come from it). The results land in OUT_DIR (JSON + markdown); nothing else changes.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,8p' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu}
VENV=${CSIST_GPU_VENV:-.venv-gpu}
PY=${PYTHON:-python3.11}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[train,dev]'
  # onnxruntime and onnxruntime-gpu install the same module: never both
  "$VENV/bin/pip" uninstall -q -y onnxruntime
  "$VENV/bin/pip" install -q 'onnxruntime-gpu[cuda,cudnn]==1.31.*'
fi
"$VENV/bin/python" -c "import onnxruntime as o; p = o.get_available_providers(); print(p); assert 'CUDAExecutionProvider' in p"
"$VENV/bin/python" -m pytest -q -m cuda tests/service/engine/test_cuda.py | tee "$OUT/tests.txt"
"$VENV/bin/csist" plans --providers CUDAExecutionProvider,CPUExecutionProvider --json "$OUT/plans.json" | tee "$OUT/plans.md"
"$VENV/bin/csist" bench speed --no-tuning --no-pair-ab --measure-seconds 1 --seconds 10 --workers 1 \
  --tracks 64 --rate 400 --max-rate 4000 --windows 512 \
  --server-setting CSIST_MAX_BATCH_SIZE=256 --server-setting CSIST_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
  --out "$OUT/speed.json" --markdown "$OUT/speed.md" > /dev/null
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
r = json.loads((out / "speed.json").read_text())
gpu = (out / "gpu.txt").read_text().strip()
print(f"\nGPU: {gpu}; CPU: {r['machine']['cpu']}\n")
print("| run | plan | backends | offered windows/s | carried windows/s | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|---|")
for name, s in r["server"].items():
    for key in ("ws_fixed", "ws_saturation"):
        if key in s:
            x = s[key]
            print(f"| {name}, {key} | {s.get('plan')} | {s.get('backends')} | {x['offered_windows_per_s']} | "
                  f"{x['windows_per_s']} | {x['p50_ms']} | {x['p99_ms']} |")
best = {row["mode"]: row["windows_per_s"] for row in r["rows"] if row["batch"] == 32}
print("\nIn-process, batch 32 (windows/s): " + ", ".join(f"{k}: {v:.0f}" for k, v in best.items()))
PY
