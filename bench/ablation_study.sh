#!/usr/bin/env bash
# The equal-compute ablation of issue 14 (docs/results.md §5.5): the same network (d_model 64, 4 layers,
# 160K parameters) trained for the same steps on the same number of tasks, one ingredient added per row:
#   ref    standard N(0, I) base, no standardisation, plain velocity, synthetic GP-law store
#   std    + per-task standardisation (context median / robust spread)
#   gp     + the per-task GP base and the residual velocity (zero head = that GP)
#   broad  + the broad synthetic prior instead of the GP law (the default model's recipe)
#   joint  as broad, joint targets instead of independent ones
#   silu   as broad, with SiLU instead of ReLU in the MLPs (ModelConfig.activation; 500 steps in the run
#          reported in docs/results.md §5.5)
#   jsilu  as silu, joint targets (the joint-vs-independent row, both with live SiLU heads)
#   pw     as silu, arch pointwise: the transformer reads target locations only, value and time enter a
#          4-layer head (the transformer runs once per solve; the divergence is 4 VJPs through the head)
#   pwn    as pw, the head also attending to its 16 nearest context points (head_neighbours)
#   pwv    as pw, the last of the 4 blocks seeing (t, y_t) (value_layers 1: a quarter of cached's per-step work)
#   pwvk4  as pwv, 4 (noise, time) draws per target and step sharing the context and location passes
#          (--path-draws 4: the same tasks and steps, a lower-variance loss, more work per step)
#   gp0    the gp row untrained (one step at learning rate 0: the zero-initialised head keeps the flow at zero,
#          so the model is exactly its GP base; scored with Euler 1, which is exact for a zero flow)
# Each model is evaluated on the GP law's frozen dense / sparse sets (with the exact oracle) and on the real
# ERA5 map's first frozen splits (bench/real_era5.py), with the same solvers for every row.
#
#   bash bench/ablation_study.sh [WORK_DIR] [STEPS]   (default /tmp/ablation, 1000 steps; resumable)
#   ONLY="silu jsilu" bash bench/ablation_study.sh WORK_DIR 1000   (just those rows, one queue each, in parallel)
#
# Two queues of one thread each (a 2-core machine); every step is skipped when its output exists.
# Results: WORK_DIR/results/*.json, logs WORK_DIR/*.out.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W=${1:-/tmp/ablation}; STEPS=${2:-1000}; mkdir -p "$W/results"; cd "$W"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NET="--arch cached --encoding lowfreq --d-model 64 --n-heads 4 --n-layers 4 --d-ff 128"
TASKS="--steps $STEPS --batch-size 4 --lr 1e-3 --warmup 50 --n-ctx 50-1000 --n-tgt 128 --ema-decay 0.995
       --ckpt-every 50 --seed 0 --quiet --resume"
GPB="--standardise context --base gp --whitening symmetric --velocity residual"
EVAL="--batch-size 4 --samples 8 --ll-solver midpoint:20 --sample-solver euler:16 --no-exact --json --quiet"
REAL="--baselines none --samples 8 --ll-solver midpoint:20 --solver euler:16 --estimator hutchinson --quiet"

[ -f store-gp/manifest.json ] || {
  flownp-ingest synthesize --out raw-gp --years 1986-1989 --seed 1 --no-progress
  flownp-ingest build raw-gp/*.nc --out store-gp
}
[ -f store-broad/manifest.json ] || {
  flownp-ingest synthesize --law broad --out raw-broad --years 1986-1989 --months 1-12 --days 1-21 \
    --hours 0,6,12,18 --seed 0 --no-progress
  flownp-ingest build raw-broad/*.nc --out store-broad
}
[ -f ev-dense/manifest.json ] || flownp-ingest eval-set store-gp --out ev-dense --split test --n-tasks 16 \
  --n-ctx 950-1000 --seed 7
[ -f ev-sparse/manifest.json ] || flownp-ingest eval-set store-gp --out ev-sparse --split test --n-tasks 8 \
  --n-ctx 50-300 --seed 7

done_at() { grep -q "\"step\": $2," "$1/log.jsonl" 2>/dev/null; }

train() {  # train NAME STORE [model flags...]
  local name=$1 store=$2; shift 2
  done_at "run-$name" "$STEPS" || { /usr/bin/time -f "%e s wall" flownp pretrain --data "$store" \
    --out "run-$name" $NET $TASKS "$@" > "train-$name.out" 2>&1; }
}

evaluate() {  # evaluate NAME: GP-law dense + sparse (oracle), real map dense (16 splits) + sparse (8)
  local name=$1 set extra=""
  [ "$name" = ref ] && extra="--baseline idw --baseline gp"
  for set in dense sparse; do
    [ -s "results/$name-syn-$set.json" ] || {
      flownp evaluate --checkpoint "run-$name/best.pt" --data store-gp --eval-set "ev-$set" $EVAL $extra \
        > "results/$name-syn-$set.json.part" && mv "results/$name-syn-$set.json.part" "results/$name-syn-$set.json"; }
  done
  [ -s "results/$name-real-dense.json" ] || python "$ROOT/bench/real_era5.py" --checkpoint "run-$name/best.pt" \
    --regime dense --splits 16 $REAL --json "results/$name-real-dense.json" > /dev/null
  [ -s "results/$name-real-sparse.json" ] || python "$ROOT/bench/real_era5.py" --checkpoint "run-$name/best.pt" \
    --regime sparse --splits 8 $REAL --json "results/$name-real-sparse.json" > /dev/null
}

baselines() {  # IDW and the fitted GP on the same real splits (the synthetic ones ride on ref's evaluation)
  [ -s results/baselines-real-dense.json ] || python "$ROOT/bench/real_era5.py" --baselines idw,gp --regime dense \
    --splits 16 --samples 8 --quiet --json results/baselines-real-dense.json > /dev/null
  [ -s results/baselines-real-sparse.json ] || python "$ROOT/bench/real_era5.py" --baselines idw,gp --regime sparse \
    --splits 8 --samples 8 --quiet --json results/baselines-real-sparse.json > /dev/null
}

untrained_gp() {  # the GP base alone, through the same code path, scored with exact one-step solvers
  done_at run-gp0 1 || flownp pretrain --data store-gp --out run-gp0 $NET --targets independent $GPB --steps 1 \
    --lr 0 --warmup 0 --batch-size 1 --n-tgt 16 --ckpt-every 1 --quiet > train-gp0.out 2>&1
  EVAL="${EVAL/midpoint:20/euler:1}"; EVAL="${EVAL/euler:16/euler:1}"
  REAL="${REAL/midpoint:20/euler:1}"; REAL="${REAL/euler:16/euler:1}"
  evaluate gp0
}

row() {  # row NAME: train the row's model with its settings
  case $1 in
    ref) train ref store-gp --targets independent ;;
    std) train std store-gp --targets independent --standardise context ;;
    gp) train gp store-gp --targets independent $GPB ;;
    broad) train broad store-broad --targets independent $GPB ;;
    joint) train joint store-broad --targets joint $GPB ;;
    silu) train silu store-broad --targets independent $GPB --activation silu ;;
    jsilu) train jsilu store-broad --targets joint $GPB --activation silu ;;
    pw) train pw store-broad --targets independent $GPB --activation silu --arch pointwise --head-layers 4 ;;
    pwn) train pwn store-broad --targets independent $GPB --activation silu --arch pointwise --head-layers 4 \
      --head-neighbours 16 ;;
    pwv) train pwv store-broad --targets independent $GPB --activation silu --arch pointwise --head-layers 4 \
      --value-layers 1 ;;
    pwvk4) train pwvk4 store-broad --targets independent $GPB --activation silu --arch pointwise --head-layers 4 \
      --value-layers 1 --path-draws 4 ;;
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

queue_a() {
  row ref; row std; row joint; row jsilu
  evaluate ref; evaluate std; evaluate joint; evaluate jsilu; untrained_gp
}

queue_b() {
  row gp; row broad; row silu
  evaluate gp; evaluate broad; evaluate silu; baselines
}

if [ -n "${ONLY:-}" ]; then
  for r in $ONLY; do (row "$r" && evaluate "$r") > "row-$r.out" 2>&1 & done
  wait
  baselines
else
  queue_a > queue-a.out 2>&1 &
  queue_b > queue-b.out 2>&1 &
  wait
fi
python "$ROOT/bench/ablation_table.py" "$W/results"
