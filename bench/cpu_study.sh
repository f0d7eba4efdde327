#!/usr/bin/env bash
# The CPU-scale study (docs/results.md): synthetic GP weather on the 1245-point circle, FlowNP in both
# target modes, the CNP and TNP-A baselines, all evaluated with the oracle, fitted GP and IDW on two
# frozen test sets (dense: n_ctx 950..1000; sparse: n_ctx 50..300). Two queues of one thread each (a
# 2-core machine); every step is skipped when its output exists, so a stopped study continues.
#
#   bash bench/cpu_study.sh [WORK_DIR]        (default /tmp/study; about 2.5 hours on 2 cores)
#
# Results: WORK_DIR/results/{joint,independent}-{dense,sparse}.json, logs in WORK_DIR/*.out.
set -euo pipefail
W=${1:-/tmp/study}; mkdir -p "$W/results"; cd "$W"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TASKS="--batch-size 8 --n-ctx 50-1000 --warmup 100 --ckpt-every 200 --quiet"

[ -f store/manifest.json ] || {
  flownp-ingest synthesize --out raw --years 1986-1989 --seed 1 --no-progress
  flownp-ingest build raw/*.nc --out store
}
[ -f evalsets/dense/manifest.json ] || flownp-ingest eval-set store --out evalsets/dense --split test \
  --n-tasks 32 --n-ctx 950-1000 --seed 7
[ -f evalsets/sparse/manifest.json ] || flownp-ingest eval-set store --out evalsets/sparse --split test \
  --n-tasks 32 --n-ctx 50-300 --seed 7

done_at() { grep -q "\"step\": $2," "$1/log.jsonl" 2>/dev/null; }

evaluate() {  # evaluate MODE SET [extra flags...]
  local mode=$1 set=$2; shift 2
  [ -s "results/$mode-$set.json" ] && return
  flownp evaluate --checkpoint "run-$mode/best.pt" --data store --eval-set "evalsets/$set" --batch-size 8 \
    --samples 16 --json --quiet "$@" > "results/$mode-$set.json.part"
  mv "results/$mode-$set.json.part" "results/$mode-$set.json"
}

queue_a() {
  done_at run-joint 2000 || flownp pretrain --data store --out run-joint --steps 2000 --targets joint $TASKS \
    --resume > train-joint.out 2>&1
  done_at run-cnp 2000 || flownp train-baseline --kind cnp --data store --out run-cnp --steps 2000 $TASKS \
    --resume > train-cnp.out 2>&1
  done_at run-tnpa 800 || flownp train-baseline --kind tnpa --data store --out run-tnpa --steps 800 $TASKS \
    --resume --max-minutes 40 > train-tnpa.out 2>&1
  local nb="--baseline idw --baseline gp --baseline cnp:run-cnp/best.pt --baseline tnpa:run-tnpa/best.pt"
  evaluate joint dense $nb
  evaluate joint sparse $nb
}

queue_b() {
  done_at run-independent 2000 || flownp pretrain --data store --out run-independent --steps 2000 \
    --targets independent $TASKS --resume > train-independent.out 2>&1
  evaluate independent dense
  evaluate independent sparse
}

queue_a > queue-a.out 2>&1 &
queue_b > queue-b.out 2>&1 &
wait
ls -l results
