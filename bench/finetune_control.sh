#!/usr/bin/env bash
# Fine-tuning re-tested with continued-pretraining controls at equal compute (issue 16 item 4), SMALL SCALE:
# a tiny joint FlowNP (2 layers, width 32) pretrained on a small synthetic GP-weather store (an early base and a
# longer-trained one), then, from the same weights and at the same optimiser steps, batch and task stream
# (FT_STEPS of batch 4, 128 targets, n_ctx 50-300):
#   mle        FT-FlowNP: MLE of K = 16 Euler reconstructions, inversion coupling, whole network, lr 5e-5
#   gav-mlp    GAV (Schur), the MLP centre on the mean-pooled context summary, residual only, lr 1e-3
#   gav-local  GAV (Schur), the local centre (a small backbone copy attending to the context), lr 1e-3
#   ctl-*      each one's control (`flownp finetune --control`): the same model, steps, tasks and lr, trained
#              by flow matching; ctl-mle is continued pretraining of the whole network
# each evaluated on one frozen test set (16 tasks, n_ctx 50-300, 128 targets) with the exact oracle: tar_ll at
# midpoint 100 (the protocol) and at euler 16 (each labelled, never mixed), the 50-sample Gaussian score, and
# CRPS, RMSE, coverage of 16 Euler-16 samples. One thread per base (the bases run in parallel); every step is
# skipped when its output exists (resumable: rerun the same command).
#
#   bash bench/finetune_control.sh [WORK_DIR] [SEEDS]      (default /tmp/ftctl "0 1")
#   env: BASES="early:1500 long:8000" (name:pretraining steps), FT_STEPS=300,
#        VARIANTS="mle ctl-mle gav-mlp ctl-gav-mlp gav-local ctl-gav-local"
# Table: python bench/finetune_control_table.py WORK_DIR   (checks every control's start against its fine-tune)
set -euo pipefail
W=${1:-/tmp/ftctl}; SEEDS=${2:-"0 1"}
VARIANTS=${VARIANTS:-"mle ctl-mle gav-mlp ctl-gav-mlp gav-local ctl-gav-local"}
BASES=${BASES:-"early:1500 long:8000"}; STEPS=${FT_STEPS:-300}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$W/results"; cd "$W"

if [ ! -f store/manifest.json ]; then
  flownp-ingest synthesize --out raw --years 1986,1988,1989 --days 1-7 --seed 0 --no-progress
  flownp-ingest build raw/*.nc --out store --quiet
fi
[ -f evalset/manifest.json ] || flownp-ingest eval-set store --out evalset --split test --n-tasks 16 \
  --n-ctx 50-300 --n-tgt 128 --seed 11

evaluate() {  # evaluate NAME CHECKPOINT
  [ -s "results/$1.json" ] && return
  flownp evaluate --checkpoint "$2" --data store --eval-set evalset --batch-size 8 --samples 16 \
    --ll-solver midpoint:100 --ll-solver-also euler:16 --gauss-samples 50 --json --quiet > "results/$1.json.part"
  mv "results/$1.json.part" "results/$1.json"
}

queue() {  # queue NAME PRETRAIN_STEPS: pretrain, then every variant and seed from its best.pt
  local b=$1 n=$2 v s flags out
  [ -f "pre-$b/done" ] || { flownp pretrain --data store --out "pre-$b" --steps "$n" --batch-size 8 \
    --n-ctx 50-300 --n-tgt 128 --d-model 32 --n-heads 2 --n-layers 2 --targets joint --warmup 100 \
    --ckpt-every 250 --quiet --resume > "pre-$b.out" 2>&1 && touch "pre-$b/done"; }
  evaluate "$b-base" "pre-$b/best.pt"
  for s in $SEEDS; do
    for v in $VARIANTS; do
      case ${v#ctl-} in
        mle) flags="--mode mle --lr 5e-5" ;;
        gav-mlp) flags="--mode gav --gav-kind schur --gav-centre mlp --lr 1e-3" ;;
        gav-local) flags="--mode gav --gav-kind schur --gav-centre local --lr 1e-3" ;;
      esac
      [ "${v#ctl-}" != "$v" ] && flags="$flags --control"
      out="ft-$b-$v-s$s"
      [ -f "$out/done" ] || { flownp finetune --from "pre-$b/best.pt" --data store --out "$out" --steps "$STEPS" \
        --batch-size 4 --n-ctx 50-300 --n-tgt 128 --k-steps 16 --inversion-steps 16 --warmup 20 --ema-decay 0.95 \
        --ckpt-every 50 --quiet --resume $flags --seed "$s" > "$out.out" 2>&1 && touch "$out/done"; }
      evaluate "$b-$v-s$s" "$out/last.pt"  # last.pt: every run at exactly the same optimiser steps
    done
  done
}

for spec in $BASES; do queue "${spec%%:*}" "${spec##*:}" > "queue-${spec%%:*}.out" 2>&1 & done
wait
ls -l results
