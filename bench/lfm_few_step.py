"""Preliminary few-step sampling at equal NFE (issue 16): global flow Euler-K vs LFM vs distilled LFM.

On a tiny synthetic store (the GP-weather law), trains at equal optimiser steps a global FlowNP and an LFM
(N blocks, steps / N each), distils the LFM into N' = 1, 2, 4 one-step maps, then scores samples of the
test tasks at NFE 1, 2, 4, 8 (one network evaluation = one NFE; an LFM's NFE = N x its per-block steps):
CRPS and RMSE of the sample mean (physical units, averaged over the 4 variables after dividing each by the
global flow's 100-step Euler value, so 1.00 = the 100-step ODE), with the exact oracle's CRPS for scale.

    OMP_NUM_THREADS=1 python bench/lfm_few_step.py --work /tmp/lfmbench --json bench/results/lfm_few_step.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flownp.checkpoint import load_checkpoint, model_from_checkpoint
from flownp.core.config import ModelConfig
from flownp.core.lfm import DistillConfig, LFMConfig
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig
from flownp.jobs.evaluate import crps_from_samples, synthetic_law
from flownp.jobs.lfm import distill, train_lfm
from flownp.jobs.train import TrainConfig, pretrain
from ingest.store import Store
from ingest.tasks import TaskConfig, TaskSampler
from ingest.variables import NAMES


def store_at(work: Path) -> Path:
    from ingest.build import build_store
    from ingest.synthetic import synthesize

    if not (work / "store" / "manifest.json").exists():
        files = synthesize(work / "raw", [1986, 1988, 1989], days=range(1, 8), seed=0, progress=False)
        build_store(files, work / "store", progress=False)
    return work / "store"


def metrics(model: Any, batches: list, store: Store, solver: SolverConfig | None, n_samples: int,
            seed: int) -> dict[str, Any]:
    """CRPS and RMSE (physical units) per variable, and the NFE of one sample set."""
    mean, std = (torch.tensor(a, dtype=torch.float32) for a in (store.normalizer.mean, store.normalizer.std))
    crps, sse, count, nfe = np.zeros(4), np.zeros(4), 0, 0
    gen = torch.Generator().manual_seed(seed)
    for b in batches:
        res = sample(model, b.xc, b.yc, b.xt, n_samples=n_samples, solver=solver or SolverConfig("euler", 1),
                     generator=gen)
        smp, truth = res.samples.float() * std + mean, b.yt.float() * std + mean
        crps += crps_from_samples(smp, truth).sum((0, 1)).double().numpy()
        sse += (smp.mean(1) - truth).pow(2).sum((0, 1)).double().numpy()
        count, nfe = count + truth.shape[0] * truth.shape[1], res.nfe
    return {"nfe": nfe, "crps": dict(zip(NAMES, (crps / count).tolist())),
            "rmse": dict(zip(NAMES, np.sqrt(sse / count).tolist()))}


def oracle_crps(store: Store, batches: list, n_samples: int, seed: int) -> dict[str, float]:
    from flownp.jobs.baselines.oracle import OraclePredictor

    orc = OraclePredictor(synthetic_law(store), store.normalizer)
    mean, std = (torch.tensor(a, dtype=torch.float32) for a in (store.normalizer.mean, store.normalizer.std))
    crps, count, gen = np.zeros(4), 0, torch.Generator().manual_seed(seed)
    for b in batches:
        smp, truth = orc.sample(b, n_samples, gen).float() * std + mean, b.yt.float() * std + mean
        crps += crps_from_samples(smp, truth).sum((0, 1)).double().numpy()
        count += truth.shape[0] * truth.shape[1]
    return dict(zip(NAMES, (crps / count).tolist()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=800, help="optimiser steps of the global flow = LFM total")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)
    store_path = store_at(a.work)
    store = Store.open(store_path)
    mc = ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, embed_hidden=32, head_hidden=64)
    tc = dict(batch_size=8, n_ctx_min=50, n_ctx_max=300, n_tgt=64, warmup=50, ckpt_every=10**6, log_every=50,
              val_batches=1, seed=0)
    lfm_cfg = LFMConfig(n_blocks=a.blocks, gamma_c=0.25, gamma_rho=2.0)
    t0, timing = time.perf_counter(), {}
    if not (a.work / "global" / "last.pt").exists():
        pretrain(store_path, a.work / "global", mc, TrainConfig(steps=a.steps, **tc), progress=False)
    timing["global_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (a.work / "lfm" / "best.pt").exists():
        train_lfm(store_path, a.work / "lfm", mc, lfm_cfg, TrainConfig(steps=a.steps // a.blocks, **tc),
                  resume=True, progress=False)
    timing["lfm_s"] = time.perf_counter() - t0
    dcfg = dict(tc, warmup=20, lr=2e-4, schedule="constant")
    for k in (1, 2, 4):
        if a.blocks % k == 0 and not (a.work / f"dist{k}" / "last.pt").exists():
            t0 = time.perf_counter()
            distill(a.work / "lfm" / "best.pt", store_path, a.work / f"dist{k}", DistillConfig(group=k, teacher_steps=4),
                    TrainConfig(steps=a.distill_steps, **dcfg), progress=False)
            timing[f"distill{k}_s"] = time.perf_counter() - t0
    load = lambda path: model_from_checkpoint(load_checkpoint(path))  # noqa: E731
    glob, lfm = load(a.work / "global" / "last.pt"), load(a.work / "lfm" / "best.pt")
    _, test = store.load("test")
    sampler = TaskSampler(test, store.region.circle_xy, TaskConfig(100, 300, 64, 4, seed=11))
    batches = [sampler[i] for i in range(a.tasks // 4)]
    with torch.no_grad():
        ref = metrics(glob, batches, store, SolverConfig("euler", 100), a.samples, 1)
        rows: dict[str, dict[int, Any]] = {"global Euler-K": {}, "LFM (Euler per block)": {}, "distilled LFM": {}}
        for nfe in (1, 2, 4, 8):
            rows["global Euler-K"][nfe] = metrics(glob, batches, store, SolverConfig("euler", nfe), a.samples, 1)
            if nfe % a.blocks == 0:
                rows["LFM (Euler per block)"][nfe] = metrics(lfm, batches, store,
                                                             SolverConfig("euler", nfe // a.blocks), a.samples, 1)
            k = a.blocks // nfe if nfe <= a.blocks and a.blocks % nfe == 0 else None
            if k and (a.work / f"dist{k}" / "last.pt").exists():
                rows["distilled LFM"][nfe] = metrics(load(a.work / f"dist{k}" / "last.pt"), batches, store, None,
                                                     a.samples, 1)
        lfm_ode = metrics(lfm, batches, store, SolverConfig("euler", 100 // a.blocks), a.samples, 1)
    ratio = lambda m, key: float(np.mean([m[key][v] / ref[key][v] for v in NAMES]))  # noqa: E731
    out = {"reference_global_euler100": ref, "lfm_euler_100": lfm_ode, "oracle_crps": oracle_crps(store, batches, a.samples, 1),
           "rows": rows, "timing_s": timing, "args": {k: str(v) for k, v in vars(a).items()}}
    print(f"{'sampler':<24}" + "".join(f"  NFE {n}: crps/rmse ratio" for n in (1, 2, 4, 8)))
    for name, r in rows.items():
        cells = "".join(f"  {ratio(r[n], 'crps'):7.3f} / {ratio(r[n], 'rmse'):6.3f}      " if n in r else f"  {'-':>7}   {'-':>6}      "
                        for n in (1, 2, 4, 8))
        print(f"{name:<24}{cells}")
    print(f"LFM 100 steps: crps ratio {ratio(lfm_ode, 'crps'):.3f}, rmse ratio {ratio(lfm_ode, 'rmse'):.3f}; "
          f"reference t2m crps {ref['crps']['t2m']:.4f} degC, oracle {out['oracle_crps']['t2m']:.4f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
