#!/usr/bin/env bash
# How the bundled model (the folder models/derefnet: model.onnx, its parts and splits,
# manifest.json and provenance.json) and its int8 variant (models/derefnet-int8) are made, step by step.
# Training is long on a 2-core CPU: run it in the background and resume with --resume.
# Two stages: DeRefNet trained on the SeqCSIST protocol (RUN), then fine-tuned from that on the
# protocol and the field scenario together (FT); the fine-tuned checkpoint is the one bundled.
set -euo pipefail
cd "$(dirname "$0")/.."
CSIST=${CSIST:-.venv/bin/csist}
RUN=${RUN:-runs/derefnet}
FT=${FT:-runs/derefnet-cond}
CKPT=${CKPT:-$FT/best.pt}      # the checkpoint exported
TEST_SEED=${TEST_SEED:-1001}   # never used for training data
TEST_DATA=data/seqcsist-test-s${TEST_SEED}
EVAL=${EVAL:-runs/eval7}       # where the metrics step writes its report

step=${1:-all}  # data, train, finetune, evaluate, export, all; or metrics, int8, reexport, split, amx
if [[ $step == data || $step == all ]]; then
  $CSIST simulate --out data/seqcsist --trajectories 5000 --seed 0
  $CSIST simulate --scenario field --out data/field-train-s7 --trajectories 3500 --seed 7
  $CSIST simulate --out "$TEST_DATA" --trajectories 750 --seed "$TEST_SEED" --split 0,0,1
fi
if [[ $step == train || $step == all ]]; then
  resume=()
  [[ -f $RUN/last.pt ]] && resume=(--resume "$RUN/last.pt")
  $CSIST train --data data/seqcsist --out "$RUN" --epochs 0.85 --lr 3e-4 --lr-min 1e-5 --threads 1 --seed 0 \
    --val-trajectories 50 --val-every 250 --save-every 50 --max-minutes 125 "${resume[@]}"
  # the end of that run is committed as models/checkpoints/derefnet-last.pt
fi
if [[ $step == finetune || $step == all ]]; then
  # on conditioned frames (background planes removed, as the service feeds the network)
  start=(--init models/checkpoints/derefnet-last.pt)
  [[ -f $FT/last.pt ]] && start=(--resume "$FT/last.pt")
  $CSIST train --data data/seqcsist data/field-train-s7 --out "$FT" --epochs 0.4 --lr 1e-4 --lr-min 1e-5 \
    --threads 1 --seed 0 --val-trajectories 50 --val-every 500 --save-every 100 --max-minutes 85 "${start[@]}"
fi
if [[ $step == evaluate ]]; then  # the checkpoint itself (PyTorch), e.g. to choose one
  $CSIST evaluate --model "$CKPT" --data "$TEST_DATA" --split test --refine none centroid fit \
    --out "$FT/test_report.json"
fi
if [[ $step == export || $step == all ]]; then
  # the provenance lists both stages: the protocol run that made models/checkpoints/derefnet-last.pt
  # (as it was run, interruptions noted), then the fine-tune's commands stored in its checkpoint
  protocol=(
    "csist train --data data/seqcsist --out runs/derefnet --epochs 1 --lr 3e-4 --lr-min 1e-5 --threads 2 --seed 0 --val-trajectories 50 --val-every 250 --save-every 50 --max-minutes 110  # stopped at step 75 (CPU contention)"
    "csist train --data data/seqcsist --out runs/derefnet --epochs 0.85 --lr 3e-4 --lr-min 1e-5 --threads 1 --seed 0 --val-trajectories 50 --val-every 250 --save-every 50 --max-minutes 125 --resume runs/derefnet/last.pt  # stopped at step 278 to switch validation to cell centres"
    "csist train --data data/seqcsist --out runs/derefnet --epochs 0.85 --lr 3e-4 --lr-min 1e-5 --threads 1 --seed 0 --val-trajectories 50 --val-every 250 --save-every 50 --max-minutes 115 --resume runs/derefnet/last.pt"
  )
  mapfile -t finetune < <(.venv/bin/python -c '
import sys, torch
for command in torch.load(sys.argv[1], map_location="cpu", weights_only=False)["state"]["commands"]:
    print(command)' "$CKPT")
  commands=()
  for c in "${protocol[@]}" "${finetune[@]}"; do commands+=(--train-command "$c"); done
  $CSIST export --checkpoint "$CKPT" --out models/derefnet \
    --data-command "csist simulate --out data/seqcsist --trajectories 5000 --seed 0" \
    --data-command "csist simulate --scenario field --out data/field-train-s7 --trajectories 3500 --seed 7" \
    --data-command "csist simulate --out $TEST_DATA --trajectories 750 --seed $TEST_SEED --split 0,0,1" \
    "${commands[@]}"
fi
if [[ $step == reexport ]]; then
  # after a change to the inference graph alone (same checkpoint, same weights): export again,
  # keeping the data and training commands its provenance records, then refresh metrics and int8
  mapfile -t recorded < <(.venv/bin/python -c '
from service.modelpkg.manifest import load_package
provenance = load_package("models/derefnet").provenance
for flag, record in (("--data-command", provenance.data), ("--train-command", provenance.training)):
    for command in record["commands"]:
        print(flag)
        print(command)')
  $CSIST export --checkpoint "$CKPT" --out models/derefnet "${recorded[@]}"
fi
if [[ $step == metrics || $step == reexport || $step == all ]]; then
  # after a post-processing change (the network unchanged): re-evaluate the bundled ONNX model and
  # refresh the metrics in its provenance without re-exporting
  mkdir -p "$EVAL"
  $CSIST evaluate --model models/derefnet --data "$TEST_DATA" --split test --refine none centroid fit \
    --threads 1 --path stream --out "$EVAL/test_report.json" --plots "$EVAL/plots"
  $CSIST export --metrics-only --out models/derefnet --eval-report "$EVAL/test_report.json"
fi
if [[ $step == int8 || $step == reexport || $step == all ]]; then
  $CSIST quantize --model models/derefnet --out models/derefnet-int8 --head \
    --eval-data "$TEST_DATA" --max-map-drop 0.5
fi
if [[ $step == split ]]; then
  # cut the existing heads for the native DeformConv kernel (export and quantize do this themselves)
  $CSIST split-head --model models/derefnet
  $CSIST split-head --model models/derefnet-int8
fi
if [[ $step == amx || $step == split || $step == reexport || $step == all ]]; then
  # the bfloat16 AMX split of the fp32 model, kept only if CSO-mAP drops by at most 0.5 (on an AMX CPU);
  # elsewhere the cut is checked in float32 and an AMX host's service checks the bfloat16 maps at start
  if .venv/bin/python -c 'from service.kernels import conv; raise SystemExit(0 if conv.AMX else 1)'; then
    $CSIST split-amx --model models/derefnet --eval-data "$TEST_DATA" --refine none fit --max-map-drop 0.5
  else
    $CSIST split-amx --model models/derefnet --float32-check
  fi
fi
