#!/usr/bin/env bash
# Paper-scale reference FlowNP on one GPU: PROTOCOL 2 architecture (arch=reference, encoding=reference,
# 238K parameters), batch 100, Adam 5e-4 with cosine decay, n_ctx 2..1199, on synthetic GP weather with
# the protocol's 32-year split (34,560 train maps). Resumable in pieces of at most MINUTES of training, so
# it fits machines lent for a few minutes at a time.
#
#   bash bench/gpu_study.sh MINUTES [TOTAL_MINUTES]
#
# Environment: GPU_MODEL (model flags, default the reference architecture), GPU_RUN (run name),
# GPU_STEPS (skip the precision/step-count timing: bf16 and this many steps), GPU_EVAL (frozen sets to
# evaluate once the run is complete, default "dense sparse").
# Work dir $GPU_WORK (default /tmp/gpu-study); a previous run can be handed in as .study/gpu-run.
# Writes to $OUT (default $GPU_WORK/out): run.tar.gz (checkpoints + log), eval-*.json, timing.json.
# Without an installed package it runs from the checkout (PYTHONPATH), with wheels from .whl if present.
set -euo pipefail
MINUTES=${1:?minutes of training in this call}; TOTAL=${2:-13}
W=${GPU_WORK:-/tmp/gpu-study}; OUT=${OUT:-$W/out}; mkdir -p "$W" "$OUT"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
ING="python3 -m ingest.cli"; NP="python3 -m flownp.jobs.cli"
REF="${GPU_MODEL:---arch reference --encoding reference --targets joint} --batch-size 100 --n-ctx 2-1199 --lr 5e-4"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

if [ ! -f "$W/paper/manifest.json" ]; then
  t0=$(date +%s)
  $ING synthesize --out "$W/raw" --years 1986-2017 --seed 1 --no-progress
  $ING build "$W"/raw/*.nc --out "$W/paper"
  # the CPU study's store (same law, same seed: identical 1986-1989 files) and its frozen sets
  $ING synthesize --out "$W/raw4" --years 1986-1989 --seed 1 --no-progress
  $ING build "$W"/raw4/*.nc --out "$W/small"
  $ING eval-set "$W/small" --out "$W/dense" --split test --n-tasks 32 --n-ctx 950-1000 --seed 7
  $ING eval-set "$W/small" --out "$W/sparse" --split test --n-tasks 32 --n-ctx 50-300 --seed 7
  echo "data ready in $(( $(date +%s) - t0 )) s"
fi

NAME=${GPU_RUN:-gpu-run}; RUN=$W/$NAME
if [ ! -f "$RUN/last.pt" ] && [ -f ".study/$NAME/last.pt" ]; then mkdir -p "$RUN"; cp ".study/$NAME"/* "$RUN/"; fi
if [ -n "${GPU_STEPS:-}" ]; then
  echo "{\"precision\": \"bf16\", \"steps\": $GPU_STEPS, \"timed\": false}" > "$W/plan.json"
elif [ ! -f "$RUN/last.pt" ]; then
  # choose precision and the step count from 40 timed steps of each
  for p in fp32 bf16; do
    flag=""; [ $p = bf16 ] && flag="--bf16"
    $NP pretrain --data "$W/paper" --out "$W/time-$p" $REF --steps 40 --warmup 10 --ckpt-every 1000 \
        --device cuda --quiet $flag > /dev/null
  done
  python3 - "$W" "$TOTAL" > "$W/plan.json" <<'PY'
import json, sys
w, total = sys.argv[1], float(sys.argv[2])
rate = {}
for p in ("fp32", "bf16"):
    recs = [json.loads(l) for l in open(f"{w}/time-{p}/log.jsonl") if "tasks_per_s" in l]
    # rate over steps 10..40 (the first steps include CUDA start-up and autotuning)
    a, b = recs[0], recs[-1]
    dt = b["step"] * 100 / b["tasks_per_s"] - a["step"] * 100 / a["tasks_per_s"]
    rate[p] = (b["step"] - a["step"]) / dt
prec = "bf16" if rate["bf16"] > 1.3 * rate["fp32"] else "fp32"
steps = int(rate[prec] * total * 60 * 0.97)
print(json.dumps({"steps_per_s": rate, "precision": prec, "steps": steps, "total_minutes": total}))
PY
  cat "$W/plan.json"
fi
cp "$W/plan.json" "$OUT/plan.json" 2>/dev/null || cp "$RUN/plan.json" "$OUT/plan.json"
STEPS=$(python3 -c "import json;print(json.load(open('$OUT/plan.json'))['steps'])")
PREC=$(python3 -c "import json;print(json.load(open('$OUT/plan.json'))['precision'])")
flag=""; [ "$PREC" = bf16 ] && flag="--bf16"
cp "$OUT/plan.json" "$W/plan.json"; mkdir -p "$RUN"; cp "$OUT/plan.json" "$RUN/plan.json"
$NP pretrain --data "$W/paper" --out "$RUN" $REF --steps "$STEPS" --warmup 500 --ckpt-every 1000 \
    --device cuda --quiet --resume --max-minutes "$MINUTES" $flag
tail -n 3 "$RUN/log.jsonl"
tar czf "$OUT/run.tar.gz" -C "$RUN" .
if grep -q "\"step\": $STEPS," "$RUN/log.jsonl"; then
  for s in ${GPU_EVAL:-dense sparse}; do
    $NP evaluate --checkpoint "$RUN/best.pt" --data "$W/small" --eval-set "$W/$s" --batch-size 8 \
        --samples 16 --device cuda --json --quiet > "$OUT/eval-$s.json"
    python3 -c "import json;r=json.load(open('$OUT/eval-$s.json'));print('$s', {k: r[k]['tar_ll'] for k in r if isinstance(r[k], dict) and 'tar_ll' in r[k]})"
  done
fi
