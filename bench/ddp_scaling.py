"""Data-parallel scaling: pretraining throughput (tasks/s) with 1 process and with N gloo processes under
`torchrun --standalone`, one thread each, same per-rank batch, on a synthetic store; prints both and the
ratio (ideal: N). On this 2-core machine N = 2 is bound by the cores (and by anything else running).

Run: python bench/ddp_scaling.py [--nproc 2] [--steps 30] [--store STORE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def tasks_per_s(cmd: list[str], out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "tasks_per_s" in r][-1]["tasks_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4, help="tasks per rank and step")
    ap.add_argument("--store", help="an existing store (default: synthesize a small one)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    try:
        store = args.store
        if not store:
            from ingest.build import build_store
            from ingest.synthetic import synthesize

            files = synthesize(work / "raw", [1986, 1988, 1989], days=range(1, 4), seed=0, progress=False)
            build_store(files, work / "store", progress=False)
            store = str(work / "store")
        job = ["pretrain", "--data", store, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--n-ctx", "500-500", "--n-tgt", "245", "--warmup", "5", "--ckpt-every", str(args.steps), "--quiet"]
        one = tasks_per_s([sys.executable, "-m", "flownp.jobs.cli", *job, "--out", str(work / "one")], work / "one")
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        many = tasks_per_s([torchrun, "--standalone", f"--nproc-per-node={args.nproc}", "-m", "flownp.jobs.cli", *job,
                            "--out", str(work / "many")], work / "many")
        print(json.dumps({"tasks_per_s_1proc": round(one, 2), f"tasks_per_s_{args.nproc}proc": round(many, 2),
                          "speedup": round(many / one, 2), "ideal": args.nproc, "cpu_count": os.cpu_count(),
                          "per_rank_batch": args.batch_size, "n_ctx": 500, "n_tgt": 245}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
