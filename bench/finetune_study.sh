#!/usr/bin/env bash
# The fine-tuning study (docs/results.md, issue 4), CPU scale, on the CPU study's store and its joint
# FlowNP (bench/cpu_study.sh must have run in WORK_DIR): from a well-trained base (run-joint, 2000 steps)
# and an early-stopped one (500 steps), at equal extra compute (same steps, K, batch, targets):
#   mle-inv (FT-FlowNP, inversion coupling), mle-rand (random coupling), gav (Hurwitz/Schur residual,
#   base frozen), gav-contr (contracting residual), gav-mlp (the paper's MLP-residual ablation).
#   MLE variants tune the whole pretrained network at lr 5e-5 (10x below pretraining); the GAV family
#   trains only a fresh residual (zero at initialisation) at lr 1e-3: Adam moves a parameter by about lr
#   per step, so at 5e-5 a fresh module could move by ~0.01 in 200 steps (variant gav-lowlr, by hand),
# each evaluated with the un-tuned base on one frozen set (16 test tasks, n_ctx 50..1000, 245 targets):
# tar_ll with the oracle's, RMSE, CRPS, calibration, context noise, and the Euler steps sweep.
# Two queues of one thread each; every step is skipped when its output exists (resumable).
#
#   bash bench/finetune_study.sh [WORK_DIR] [SEEDS]     (default /tmp/study "0 1"; the early base: seed 0)
#   env: BASES="joint early", VARIANTS="mle-inv gav mle-rand gav-mlp gav-contr", FT_STEPS=200
#
# Results: WORK_DIR/ft-results/*.json; summary: python bench/finetune_table.py WORK_DIR/ft-results
set -euo pipefail
W=${1:-/tmp/study}; SEEDS=${2:-"0 1"}; VARIANTS=${VARIANTS:-"mle-inv gav mle-rand gav-mlp gav-contr"}
cd "$W"; mkdir -p ft-results
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
STEPS=${FT_STEPS:-200}
FT="--data store --steps $STEPS --batch-size 4 --n-ctx 50-1000 --n-tgt 128 --k-steps 16 --inversion-steps 16
    --lr 5e-5 --warmup 20 --ema-decay 0.95 --ckpt-every 50 --quiet --resume"

[ -f evalsets/ft/manifest.json ] || flownp-ingest eval-set store --out evalsets/ft --split test --n-tasks 16 \
  --n-ctx 50-1000 --n-tgt 245 --seed 11
[ -f run-early/best.pt ] || flownp pretrain --data store --out run-early --steps 500 --batch-size 8 \
  --n-ctx 50-1000 --warmup 100 --ckpt-every 100 --quiet --resume > train-early.out 2>&1

evaluate() {  # evaluate NAME CHECKPOINT
  [ -s "ft-results/$1.json" ] && return
  flownp evaluate --checkpoint "$2" --data store --eval-set evalsets/ft --batch-size 8 --samples 16 \
    --ll-solver midpoint:25 --context-noise gaussian:0.1 --context-noise salt-pepper:0.05 \
    --steps-sweep 1,2,4,8,16,32 --json --quiet > "ft-results/$1.json.part"
  mv "ft-results/$1.json.part" "ft-results/$1.json"
}

variant() {  # variant BASE_NAME VARIANT SEED
  local base=$1 v=$2 s=$3 flags
  case $v in
    mle-inv) flags="--mode mle --coupling inversion" ;;
    mle-rand) flags="--mode mle --coupling random" ;;
    gav) flags="--mode gav --gav-kind schur --lr 1e-3" ;;
    gav-contr) flags="--mode gav --gav-kind contracting --lr 1e-3" ;;
    gav-mlp) flags="--mode gav --gav-kind mlp --lr 1e-3" ;;
    gav-lowlr) flags="--mode gav --gav-kind schur" ;;  # at the MLE lr, 5e-5
  esac
  local out="ft-$base-$v-s$s"
  flownp finetune --from "run-$base/best.pt" --out "$out" $FT $flags --seed "$s" > "$out.out" 2>&1
  evaluate "$base-$v-s$s" "$out/best.pt"
}

queue() {  # queue BASE SEED EVAL_BASE(0/1)
  local base=$1 s=$2
  [ "$3" = 1 ] && evaluate "$base-base" "run-$base/best.pt"
  for v in $VARIANTS; do variant "$base" "$v" "$s"; done
}

# one queue (one thread) per base and seed, all in parallel; BASES=early (or joint) runs one base only,
# e.g. the early base while the joint one is still training
for base in ${BASES:-joint early}; do
  if [ "$base" = early ]; then seeds=0; else seeds=$SEEDS; fi
  first=1
  for s in $seeds; do queue "$base" "$s" $first > "ft-queue-$base-s$s.out" 2>&1 & first=0; done
done
wait
ls -l ft-results
