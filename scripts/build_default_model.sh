#!/usr/bin/env bash
# Rebuilds the embedded default model (flownp/models/default.pt + default.json) with the
# project's own commands: synthetic GP weather -> store -> a small FlowNP pretrained on CPU.
# SYNTHETIC: trained on generated GP weather, not on ERA5; it demonstrates the service, nothing more.
# Usage: bash scripts/build_default_model.sh [WORKDIR]   (a few minutes of CPU; WORKDIR is scratch)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
BIN="${FLOWNP_BIN:-$(dirname "$(command -v flownp)")}"
STEPS="${STEPS:-300}"
mkdir -p "$WORK"
"$BIN/flownp-ingest" synthesize --out "$WORK/raw" --years 1986,1988,1989 --days 1-4 --seed 0 --no-progress
"$BIN/flownp-ingest" build "$WORK"/raw/*.nc --out "$WORK/store"
"$BIN/flownp" pretrain --data "$WORK/store" --out "$WORK/run" --steps "$STEPS" --batch-size 8 --lr 2e-3 \
    --warmup 20 --n-ctx 50-1000 --n-tgt 128 --d-model 32 --n-layers 4 --targets joint --seed 0 \
    --ckpt-every "$STEPS" --quiet
"$BIN/python" -m flownp.default_model pack "$WORK/run/best.pt" --out "$ROOT/flownp/models" \
    --recipe "scripts/build_default_model.sh (STEPS=$STEPS)"
