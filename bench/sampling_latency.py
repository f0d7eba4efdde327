"""Latency and CRPS of each sampler (issue 16 item 5): the global ODE, LFM and distilled samplers on
1000-context / 245-target requests with 8 samples, timed through the service's own code in process
(`service.sampling.sampling_for` picks the plan and solvers, `service.engine.run_extrapolate` runs it under
a `Job` check, no HTTP), p50 / p90 over repeats, and CRPS of the 8 samples against the held-out values in
ERA5 units (Pa, K, m/s); every row as ratios to the global flow's ODE at 100 midpoint steps measured in the
same run (1.00 = that ODE; lower is better for both).

Task: held-out synthetic GP-weather maps (the law of `flownp-ingest synthesize`, one fresh map per repeat,
seeded), or with `--task era5` the one real ERA5 map (../shared/data/era5; skipped with a message when
absent). Repeat r splits the 1245 circle points by a seeded permutation: context 1000 (`--n-ctx`), targets
the rest. `--tiny` builds tiny untrained models of every kind (a smoke run: the numbers mean nothing).

    OMP_NUM_THREADS=1 python bench/sampling_latency.py --global RUN/best.pt --lfm LFM/best.pt \\
        --distilled DIST/last.pt [--repeats 11] [--json OUT.json]
    OMP_NUM_THREADS=1 python bench/sampling_latency.py --tiny --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from flownp.checkpoint import load_checkpoint  # noqa: E402
from flownp.core.solvers import SolverConfig  # noqa: E402
from flownp.inference import LoadedModel, build_model, default_checkpoint, parse_solver, task  # noqa: E402
from ingest.region import MEMPHIS  # noqa: E402
from ingest.variables import NAMES, model_to_era5  # noqa: E402

ERA5_MAP = ROOT.parent / "shared" / "data" / "era5" / "geocat_era5_1995-07-14T12_conus.nc"
REFERENCE = "midpoint:100"
SAMPLES = 8


class Skip(Exception):
    """The bench cannot run as asked on this machine (a missing data file): printed, exit status 0."""


# ---- models -----------------------------------------------------------------------------------------
def tiny_models() -> dict[str, dict[str, Any]]:
    """Untrained tiny checkpoints of every kind on the embedded default's region and normaliser."""
    from flownp.core.config import ModelConfig
    from flownp.core.lfm import LFM, DistillConfig, DistilledSampler, LFMConfig
    from flownp.core.model import FlowNP

    base = {k: v for k, v in default_checkpoint()[0].items() if k not in ("model", "ema")}
    cfg = ModelConfig(targets="independent", d_model=16, n_heads=2, n_layers=1, d_ff=16, embed_hidden=16,
                      embed_layers=1, head_hidden=16, space_freqs=4, time_freqs=4)
    torch.manual_seed(0)
    lfm = LFM(cfg, LFMConfig(n_blocks=2))
    dist = DistilledSampler(lfm, DistillConfig(group=1))
    def ck(kind: str, m: torch.nn.Module, **kw: Any) -> dict[str, Any]:
        return {**base, "kind": kind, "model_config": cfg.to_dict(), "model": m.state_dict(), "ema": None, **kw}

    return {"global": ck("pretrain", FlowNP(cfg)), "lfm": ck("lfm", lfm, lfm_config=lfm.lfm_config.to_dict()),
            "distilled": ck("distilled", dist, distill={"config": dist.distill_config.to_dict(),
                                                        "teacher_lfm_config": lfm.lfm_config.to_dict()})}


def load_models(a: argparse.Namespace) -> tuple[dict[str, LoadedModel], dict[str, str]]:
    """The models by name (global, lfm, distilled, distilled-2, ...) and where each came from."""
    cks = tiny_models() if a.tiny else {}
    src = {n: "tiny, untrained" for n in cks}
    named = [p.split("=", 1) if "=" in p else ("distilled" if i == 0 else f"distilled-{i + 1}", p)
             for i, p in enumerate(a.distilled or [])]
    given = [("global", a.global_ck), ("lfm", a.lfm)] + [(n, p) for n, p in named]
    for name, path in given:
        if path:
            cks[name], src[name] = load_checkpoint(path), str(path)
    if "global" not in cks:
        raise SystemExit("give --global CHECKPOINT (the reference ODE) or --tiny")
    return {name: build_model(name, ck, None, "bench") for name, ck in cks.items()}, src


# ---- the task ---------------------------------------------------------------------------------------
def held_out_maps(kind: str, repeats: int, seed: int, era5: Path) -> tuple[np.ndarray, str]:
    """(repeats, 1245, 4) circle values in ERA5 units (one map per repeat; the one real map repeated)."""
    if kind == "era5":
        if not era5.exists():
            raise Skip(f"skipped: the real ERA5 map {era5} is not there (--task era5 needs ../shared/data/era5 "
                       "beside the checkout, or --era5 PATH); --task synthetic runs anywhere")
        from ingest.layout import canonicalize, check_finite, cut_region, to_points

        ds = cut_region(canonicalize(era5), MEMPHIS, source=str(era5))
        pts = np.asarray(to_points(ds, MEMPHIS).values)[0]
        check_finite(pts[None], ds["time"].values, str(era5))
        return np.repeat(model_to_era5(pts)[None], repeats, 0), f"real ERA5 map {era5.name}"
    from ingest.synthetic import GPWeather

    law = GPWeather(region=MEMPHIS)
    return model_to_era5(law.to_points(law.sample_maps(repeats, seed))), "synthetic GP-weather maps (held out)"


def split(r: int, n_ctx: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([seed, r]).permutation(MEMPHIS.n_points)
    return perm[:n_ctx], perm[n_ctx:]


def crps(samples: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean CRPS per variable (4,) of samples (S, n, 4) against truth (n, 4), in their units."""
    from flownp.jobs.evaluate import crps_from_samples

    return crps_from_samples(torch.from_numpy(samples)[None], torch.from_numpy(truth)[None])[0].mean(0).numpy()


# ---- one row: a model, a sampler, a solver ------------------------------------------------------------
def measure(lm: LoadedModel, sampler: str, solver: str | None, maps: np.ndarray, a: argparse.Namespace,
            ) -> dict[str, Any]:
    """Time `repeats` requests (after one warm-up) through the service's code; their CRPS."""
    from service.engine import Job, run_extrapolate
    from service.sampling import sampling_for

    spec = parse_solver(solver) if solver else None
    plan = sampling_for(lm, sampler, spec.method if spec else None, spec.steps if spec else None, None, None, 10**6)
    r = lm.region
    lat, lon = r.circle_lat, r.circle_lon
    times, scores, nfe = [], [], None
    for i in range(-1, a.repeats):  # -1: the warm-up
        c, t = split(max(i, 0), a.n_ctx, a.seed)
        vals = maps[max(i, 0)]
        tk = task(lm.space, lat[c], lon[c], vals[c], lat[t], lon[t])
        t0 = time.perf_counter()
        out = run_extrapolate(lm, tk, num_samples=a.samples, solver=plan.solver, seed=a.seed + i + 1, with_ll=False,
                              ll_solver=plan.ll_solver, estimator="none", n_probes=1,
                              check=Job(time.monotonic() + 3600), sampler=plan.plan.name)
        dt = time.perf_counter() - t0
        if i >= 0:
            times.append(dt)
            scores.append(crps(out["samples"], vals[t]))
        nfe = out["nfe"]
    cost = plan.cost(n_ctx=a.n_ctx, n_tgt=MEMPHIS.n_points - a.n_ctx, num_samples=a.samples, with_ll=False,
                     estimator="none", n_probes=1, gp_base=bool(getattr(lm.model, "has_task_transform", False)))
    ts = sorted(times)
    return {"model": lm.version, "model_kind": lm.info["model_kind"], "sampler": plan.plan.name,
            "solver": solver if plan.plan.uses_solver else None, "blocks": plan.plan.blocks, "maps": plan.plan.maps,
            "nfe": nfe, "cost_units": cost, "p50_s": statistics.median(ts), "p90_s": ts[int(0.9 * (len(ts) - 1))],
            "times_s": times, "crps": dict(zip(NAMES, np.mean(scores, 0).tolist()))}


def rows_for(lm: LoadedModel, a: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(sampler, solver) rows of one model: every sampler it offers, the ODE / LFM ones at each listed
    solver (per block for the LFM), distilled maps once."""
    out: list[tuple[str, str | None]] = []
    for s in lm.samplers["offered"]:
        if s == "distilled":
            out.append((s, None))
        else:
            out += [(s, sol) for sol in (a.ode_solvers if s == "ode" else a.lfm_solvers)]
    return out


def ratios(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """CRPS per variable over the reference's, averaged over the 4 variables; p50 and p90 latency over its."""
    return {"crps_ratio": float(np.mean([row["crps"][v] / ref["crps"][v] for v in NAMES])),
            "p50_ratio": row["p50_s"] / ref["p50_s"], "p90_ratio": row["p90_s"] / ref["p90_s"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global", dest="global_ck", help="a global FlowNP checkpoint (the reference ODE)")
    p.add_argument("--lfm", help="an LFM checkpoint (flownp train-lfm)")
    p.add_argument("--distilled", nargs="+", metavar="[NAME=]PATH", help="distilled checkpoint(s) (flownp distill)")
    p.add_argument("--tiny", action="store_true", help="tiny untrained models of every kind (smoke run)")
    p.add_argument("--task", choices=("synthetic", "era5"), default="synthetic")
    p.add_argument("--era5", type=Path, default=ERA5_MAP, help="the real map for --task era5")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--n-ctx", type=int, default=1000, help="context points (targets: the rest of the 1245)")
    p.add_argument("--reference", default=REFERENCE, help="the global ODE's solver every ratio divides by")
    p.add_argument("--ode-solvers", default="euler:1,euler:4,euler:8", help="global ODE rows (with the reference)")
    p.add_argument("--lfm-solvers", default="euler:1,euler:2", help="LFM rows, the solver per block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, help="write everything here")
    a = p.parse_args(argv)
    a.ode_solvers = [a.reference] + [s for s in a.ode_solvers.split(",") if s and s != a.reference]
    a.lfm_solvers = [s for s in a.lfm_solvers.split(",") if s]
    for s in a.ode_solvers + a.lfm_solvers:
        if parse_solver(s).method not in ("euler", "midpoint", "rk4"):
            p.error(f"{s}: a fixed-step solver (euler, midpoint, rk4), as the service runs")
    if not 0 < a.n_ctx < MEMPHIS.n_points or a.repeats < 1:
        p.error("--n-ctx must leave targets on the 1245-point circle and --repeats be >= 1")
    return a


def run(a: argparse.Namespace) -> dict[str, Any]:
    if a.threads:
        torch.set_num_threads(a.threads)
    maps, what = held_out_maps(a.task, a.repeats, a.seed, a.era5)
    models, sources = load_models(a)
    ref = measure(models["global"], "ode", a.reference, maps, a)
    rows = [ref] + [measure(lm, s, sol, maps, a) for lm in models.values() for s, sol in rows_for(lm, a)
                    if not (lm.version == "global" and s == "ode" and sol == a.reference)]
    for row in rows:
        row.update(ratios(row, ref))
    return {"task": {"kind": a.task, "values": what, "n_ctx": a.n_ctx, "n_tgt": MEMPHIS.n_points - a.n_ctx,
                     "samples": a.samples, "repeats": a.repeats, "seed": a.seed, "threads": torch.get_num_threads()},
            "reference": {"model": "global", "sampler": "ode", "solver": a.reference,
                          "p50_s": ref["p50_s"], "crps": ref["crps"]},
            "models": {n: {"kind": lm.info["model_kind"], "samplers": lm.samplers["offered"], "checkpoint": sources[n],
                           "model_config": lm.info["model_config"]} for n, lm in models.items()},
            "rows": rows, "tiny": a.tiny}


def print_table(res: dict[str, Any]) -> None:
    t = res["task"]
    print(f"{t['values']}: {t['n_ctx']} context / {t['n_tgt']} targets, {t['samples']} samples, {t['repeats']} "
          f"repeats, {t['threads']} thread(s); ratios to the global ODE {res['reference']['solver']} "
          f"(p50 {res['reference']['p50_s']:.3f} s)" + ("  [TINY UNTRAINED MODELS: smoke run]" if res["tiny"] else ""))
    print(f"{'model':<12} {'sampler':<10} {'solver':<14} {'NFE':>5} {'p50 s':>8} {'p90 s':>8} {'latency':>8} "
          f"{'CRPS':>6}   CRPS sp [Pa] / t2m [K] / u10 / v10 [m/s]")
    for r in res["rows"]:
        sol = r["solver"] or f"{r['maps']} maps"
        if r["solver"] and r["blocks"] > 1:
            sol += f" x{r['blocks']}"
        c = r["crps"]
        print(f"{r['model']:<12} {r['sampler']:<10} {sol:<14} {r['nfe']:>5} {r['p50_s']:>8.3f} {r['p90_s']:>8.3f} "
              f"{r['p50_ratio']:>8.3f} {r['crps_ratio']:>6.3f}   {c['sp']:.1f} / {c['t2m']:.3f} / {c['u10']:.3f} / "
              f"{c['v10']:.3f}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        res = run(a)
    except Skip as exc:
        print(exc)
        return 0
    print_table(res)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
