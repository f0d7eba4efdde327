"""Few-step sampling at equal NFE on the GP-base recipe (issue 16, item 3): a trained global FlowNP with Euler-K
against an LFM trained at the same optimiser steps and tasks, the distilled LFM and the distilled global flow,
on the GP law's frozen synthetic sets (with the exact oracle) and the real ERA5 map's first frozen splits.

    OMP_NUM_THREADS=1 python bench/few_step_study.py --global RUN/best.pt --data STORE --work WORK \\
        --syn-store STORE_GP --syn-sets EV_DENSE,EV_SPARSE --json WORK/few_step.json

What it trains (resumable: every model is skipped when its checkpoint exists, so a stopped run goes on):
- an LFM of N blocks with the global flow's network settings and training settings, steps / N optimiser
  steps per block (the same optimiser steps and tasks in all; its wall time, push-forwards included, is
  recorded next to the global flow's);
- distilled LFM maps (group k -> N' = N / k one-step maps) and distilled global-flow maps (N segments, group k),
  `--distill-steps` each on their teacher's pairs.
What it scores, per sampler and NFE (one network evaluation = one NFE; an LFM's = N x steps per block), in
physical units (kPa, degC, m/s): CRPS and RMSE of the sample mean per variable, their mean over variables as a
ratio to the global flow's reference solve (`--reference`, default Euler 100) in the same run, rank coverage
50/90% (flownp.scores), and the log score of a Gaussian fitted to the samples per point (`gauss_ll`, nats per
target point, 4 variables summed, normalised units). All samplers see the same noise and the same per-task
GP transforms. Also tar_ll (exact-blocks, normalised units) of the global flow and the LFM at equal solver
NFE, the gap to the oracle on the synthetic sets, and tar_ll over ERA5 units on the real map.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from flownp.checkpoint import load_checkpoint, model_from_checkpoint
from flownp.core.config import ModelConfig
from flownp.core.likelihood import log_likelihood
from flownp.core.lfm import DistillConfig, LFMConfig
from flownp.core.sampling import sample, task_transform
from flownp.core.solvers import SolverConfig
from flownp.inference import parse_solver
from flownp.jobs.evaluate import crps_from_samples, gaussian_fit_log_score, synthetic_law
from flownp.jobs.train import TrainConfig
from flownp.scores import rank_coverage
from ingest.normalize import Normalizer
from ingest.space import log_jacobian
from ingest.tasks import TaskBatch
from ingest.variables import NAMES

REAL_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "era5" / \
    "geocat_era5_1995-07-14T12_conus.nc"


# ---- the sets --------------------------------------------------------------------------------------
def synthetic_sets(store_path: Path, sets: list[Path], normalizer: Normalizer, n_tasks: int) -> dict[str, Any]:
    """name -> (batches of one task in the model's normalisation, the GP law's oracle or None)."""
    from flownp.jobs.evaluate import eval_tasks
    from ingest.store import Store

    store = Store.open(store_path)
    out = {}
    for es_path in sets:
        es, times, _ = eval_tasks(store, "test", eval_set=str(es_path))
        _, phys = store.load("test", normalized=False)
        values = normalizer.normalize(phys).astype(np.float32)
        batches = list(es.batches(values, store.region.circle_xy, times, 1))[:n_tasks]
        out[f"synthetic {es_path.name}"] = (batches, synthetic_law(store))
    return out


def real_sets(file: Path, normalizer: Normalizer, n_splits: int) -> dict[str, Any]:
    """The real map's first frozen splits per regime (bench/real_era5.py), one task per batch."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_era5 import load_map, make_splits, task_batch  # noqa: E402

    from ingest.region import MEMPHIS

    phys, _ = load_map(file)
    values = normalizer.normalize(phys)
    return {f"real {r}": ([task_batch(values, MEMPHIS.circle_xy, s) for s in make_splits(r, n_splits, 0,
                                                                                          MEMPHIS.n_points)], None)
            for r in ("dense", "sparse")}


# ---- training the competitors ----------------------------------------------------------------------
def train_competitors(a: argparse.Namespace, ck: dict[str, Any]) -> dict[str, Any]:
    """LFM and the distilled maps (skipped when present); -> wall seconds per model trained now."""
    from flownp.jobs.lfm import distill, train_lfm

    mc = ModelConfig.from_dict(ck["model_config"])
    tc = TrainConfig.from_dict(ck["train_config"])
    per_block = max(1, tc.steps // a.blocks)
    push = parse_solver(a.push)
    lfm_cfg = LFMConfig(n_blocks=a.blocks, gamma_c=a.gamma_c, gamma_rho=a.gamma_rho, push_method=push.method,
                        push_steps=push.steps)
    timing: dict[str, Any] = {"global_steps": tc.steps, "lfm_steps_per_block": per_block}
    lfm_dir = a.work / "lfm"
    if not (lfm_dir / "best.pt").exists():
        t0 = time.perf_counter()
        train_lfm(a.data, lfm_dir, mc, lfm_cfg, TrainConfig.from_dict({**tc.to_dict(), "steps": per_block}),
                  resume=True, progress=False)
        timing["lfm_s"] = time.perf_counter() - t0
    teacher = parse_solver(a.teacher)
    dcfg = TrainConfig.from_dict({**tc.to_dict(), "steps": a.distill_steps, "warmup": 20, "lr": 2e-4,
                                  "schedule": "constant"})
    for k in a.groups:
        for name, path, segs in (("lfm", lfm_dir / "best.pt", a.blocks), ("global", Path(a.global_), a.blocks)):
            out = a.work / f"distilled-{name}-k{k}"
            if segs % k or (out / "last.pt").exists():
                continue
            t0 = time.perf_counter()
            distill(path, a.data, out, DistillConfig(group=k, segments=segs, teacher_method=teacher.method,
                                                    teacher_steps=teacher.steps), dcfg, resume=True,
                    progress=False)
            timing[f"distilled-{name}-k{k}_s"] = time.perf_counter() - t0
    return timing


# ---- scoring ---------------------------------------------------------------------------------------
def score_samples(model: Any, batches: list[TaskBatch], transforms: list[Any], noise: list[torch.Tensor],
                  solver: SolverConfig, normalizer: Normalizer) -> dict[str, Any]:
    """Sample metrics over the batches (same noise and transforms for every sampler)."""
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in (normalizer.mean, normalizer.std))
    acc = {k: np.zeros(4) for k in ("crps", "sse", "cov50", "cov90")}
    gauss, count, nfe = [], 0, 0
    for b, tr, y0 in zip(batches, transforms, noise):
        res = sample(model, b.xc, b.yc, b.xt, solver=solver, y0=y0, transform=tr)
        smp, truth = res.samples.double() * std + mean, b.yt.double() * std + mean
        acc["crps"] += crps_from_samples(smp, truth).sum((0, 1)).numpy()
        acc["sse"] += (smp.mean(1) - truth).pow(2).sum((0, 1)).numpy()
        acc["cov50"] += rank_coverage(smp, truth, 0.5).sum((0, 1)).numpy()
        acc["cov90"] += rank_coverage(smp, truth, 0.9).sum((0, 1)).numpy()
        gauss.append(float(gaussian_fit_log_score(res.samples.double(), b.yt.double()).mean()))
        count, nfe = count + truth.shape[0] * truth.shape[1], res.nfe
    per = lambda v: dict(zip(NAMES, v.tolist()))  # noqa: E731
    return {"nfe": nfe, "crps": per(acc["crps"] / count), "rmse": per(np.sqrt(acc["sse"] / count)),
            "cov50": per(acc["cov50"] / count), "cov90": per(acc["cov90"] / count),
            "gauss_ll": float(np.mean(gauss))}


def tar_ll(model: Any, batches: list[TaskBatch], transforms: list[Any], solver: SolverConfig) -> float:
    """Mean over tasks of the log-likelihood per target point, normalised units: exact (exact-blocks) for
    independent targets, one seeded Hutchinson probe for joint ones."""
    vals = [float(log_likelihood(model, b.xc, b.yc, b.xt, b.yt, solver=solver, estimator="auto",
                                 transform=tr).joint.mean()) / b.xt.shape[1] for b, tr in zip(batches, transforms)]
    return float(np.mean(vals))


def oracle_ll(law: Any, batches: list[TaskBatch], normalizer: Normalizer) -> float:
    from flownp.jobs.baselines.oracle import OraclePredictor

    orc = OraclePredictor(law, normalizer)
    return float(np.mean([float(orc.log_likelihood(b).mean()) / b.xt.shape[1] for b in batches]))


def ratio(m: dict[str, Any], ref: dict[str, Any], key: str) -> float:
    return float(np.mean([m[key][v] / ref[key][v] for v in NAMES]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global", dest="global_", required=True, help="the trained global FlowNP checkpoint")
    p.add_argument("--data", type=Path, required=True, help="the store the global flow was trained on")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--gamma-c", type=float, default=0.25)
    p.add_argument("--gamma-rho", type=float, default=2.0)
    p.add_argument("--push", default="euler:2", help="LFM push-forward solver per block")
    p.add_argument("--teacher", default="midpoint:4", help="teacher solver per block / segment (distillation)")
    p.add_argument("--groups", default="1,2,4", help="distillation groups k (N' = N / k maps)")
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--syn-store", type=Path, help="the synthetic store of --syn-sets (GP law: exact oracle)")
    p.add_argument("--syn-sets", default="", help="comma-separated frozen eval sets of --syn-store")
    p.add_argument("--real-file", type=Path, default=REAL_FILE)
    p.add_argument("--tasks", type=int, default=8, help="tasks per set (synthetic) and splits per regime (real)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--nfe", default="1,2,4,8,16")
    p.add_argument("--reference", default="euler:100", help="the global flow's reference solve")
    p.add_argument("--ll-nfe", type=int, default=32, help="likelihood solver NFE (midpoint), global = LFM total")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    a.groups = [int(k) for k in a.groups.split(",") if k]
    nfes = [int(n) for n in a.nfe.split(",") if n]
    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(a.global_)
    normalizer = Normalizer.from_dict(ck["normalizer"])
    timing = train_competitors(a, ck)
    load = lambda path: model_from_checkpoint(load_checkpoint(path)).eval()  # noqa: E731
    glob, lfm = load(a.global_), load(a.work / "lfm" / "best.pt")
    distilled = {(name, k): load(a.work / f"distilled-{name}-k{k}" / "last.pt") for k in a.groups
                 for name in ("lfm", "global") if (a.work / f"distilled-{name}-k{k}" / "last.pt").exists()}
    sets: dict[str, Any] = {}
    if a.syn_sets:
        sets.update(synthetic_sets(a.syn_store, [Path(s) for s in a.syn_sets.split(",")], normalizer, a.tasks))
    if a.real_file.exists():
        sets.update(real_sets(a.real_file, normalizer, a.tasks))
    else:
        print(f"real map absent ({a.real_file}): real-map rows skipped")
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "timing_s": timing, "sets": {}}
    for set_name, (batches, law) in sets.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            transforms = [task_transform(glob, b.xc, b.yc, b.xt) for b in batches]
        g = torch.Generator().manual_seed(1)
        noise = [torch.randn((1, a.samples, b.xt.shape[1], 4), generator=g) for b in batches]
        rows: dict[str, dict[str, Any]] = {}

        def run(name: str, nfe: int, fn: Callable[[], dict[str, Any]]) -> None:
            rows.setdefault(name, {})[str(nfe)] = fn()

        with torch.no_grad():
            ref = score_samples(glob, batches, transforms, noise, parse_solver(a.reference), normalizer)
            for nfe in nfes:
                run("global flow, Euler-K", nfe, lambda: score_samples(glob, batches, transforms, noise,
                                                                       SolverConfig("euler", nfe), normalizer))
                if nfe % a.blocks == 0:
                    run(f"LFM ({a.blocks} blocks), Euler per block", nfe,
                        lambda: score_samples(lfm, batches, transforms, noise,
                                              SolverConfig("euler", nfe // a.blocks), normalizer))
            for (name, k), m in sorted(distilled.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
                n_maps = a.blocks // k
                run(f"distilled {'LFM' if name == 'lfm' else 'global flow'}", n_maps,
                    lambda: score_samples(m, batches, transforms, noise, SolverConfig("euler", 1), normalizer))
        ll_solver_g = SolverConfig("midpoint", max(1, a.ll_nfe // 2))
        ll_solver_l = SolverConfig("midpoint", max(1, a.ll_nfe // (2 * a.blocks)))
        ll = {"global flow": tar_ll(glob, batches, transforms, ll_solver_g),
              "LFM": tar_ll(lfm, batches, transforms, ll_solver_l),
              "solvers": {"global flow": ll_solver_g.describe(), "LFM": f"{ll_solver_l.describe()} per block"}}
        if law is not None:
            ll["oracle"] = oracle_ll(law, batches, normalizer)
        if set_name.startswith("real"):
            off = log_jacobian(normalizer, "era5")
            ll["era5"] = {"global flow": ll["global flow"] + off, "LFM": ll["LFM"] + off,
                          "units": "nats per target point over ERA5 units (Pa, K, m/s)"}
        for r in rows.values():
            for m in r.values():
                m["crps_ratio"], m["rmse_ratio"] = ratio(m, ref, "crps"), ratio(m, ref, "rmse")
        out["sets"][set_name] = {"n_tasks": len(batches), "reference": {"solver": a.reference, **ref},
                                 "rows": rows, "tar_ll": ll, "seconds": time.perf_counter() - t0}
        print(f"\n{set_name} ({len(batches)} tasks, {a.samples} samples; CRPS / RMSE ratio to the global flow's "
              f"{a.reference}; cov90 t2m; gauss_ll)")
        for name, r in rows.items():
            cells = "  ".join(f"NFE {n}: {m['crps_ratio']:.3f}/{m['rmse_ratio']:.3f} {m['cov90']['t2m']:.2f} "
                              f"{m['gauss_ll']:.2f}" for n, m in r.items())
            print(f"  {name:<36} {cells}")
        print(f"  tar_ll: " + ", ".join(f"{k} {v:.3f}" for k, v in ll.items() if isinstance(v, float)))
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
