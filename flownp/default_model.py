"""The embedded default model: a small FlowNP on a per-task GP base (docs/protocol.md §10), trained on the
SYNTHETIC broad weather prior (never on ERA5), shipped as package data of flownp (so the Jupyter API and the
service both have it without importing each other). Its figures on the one real ERA5 map
(bench/real_era5.py) are in its manifest.

Files (flownp/models/): `default.pt` (a self-describing checkpoint, EMA weights only) and `default.json`
(its manifest: sha256, what it was trained on, the recipe). Rebuild with scripts/build_default_model.sh,
which ends in `python -m flownp.default_model pack RUN/best.pt --out flownp/models`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flownp.core.solvers import NFE_PER_STEP
from ingest.io import atomic_path, sha256_file

MODELS_DIR = Path(__file__).resolve().parent / "models"
CHECKPOINT = "default.pt"
MANIFEST = "default.json"
VERSION = "synthetic-default"


def default_paths(root: Path | None = None) -> tuple[Path, Path]:
    """(checkpoint, manifest) of the embedded model."""
    root = root or MODELS_DIR
    return root / CHECKPOINT, root / MANIFEST


def read_manifest(root: Path | None = None) -> dict[str, Any]:
    return json.loads(default_paths(root)[1].read_text())


def describe(model_config: dict[str, Any] | None) -> str:
    """The manifest's one-paragraph description of a packed model, from its `ModelConfig` dict: the network
    (cached, joint or pointwise; docs/protocol.md §7), its base, and that it was trained on synthetic weather."""
    cfg = model_config or {}
    arch = cfg.get("arch", "cached")
    if arch == "pointwise":
        m = int(cfg.get("value_layers", 0))
        net = ("pointwise transformer (each target location's context summary computed once per solve, "
               + (f"the last {m} block(s) attending to the context with the target's value and time, " if m else "")
               + "then a value-and-time head)")
    else:
        net = f"{arch} transformer over context and target tokens ({cfg.get('targets', 'joint')} targets)"
    base = ("a per-task Gaussian-process base (context standardisation, per-variable GP posterior fitted on each "
            f"request's context, {cfg.get('whitening', 'symmetric')} whitening, {cfg.get('velocity', 'network')} velocity)"
            if cfg.get("base") == "gp" else "a standard normal base")
    return (f"FlowNP, a {net}, on {base}, pretrained on the SYNTHETIC broad weather prior (not on ERA5). "
            "Its figures on the one real ERA5 map of the benchmark, against IDW and a fitted GP, are in real_map "
            "below and docs/results.md.")


TRAINED_ON = ("flownp-ingest synthesize --law broad --years 1986-1989 --months 1-12 --days 1-21 "
              "--hours 0,6,12,18 --seed 0 (train 1986-87: 2016 maps)")


# what a solver may cost in accuracy to become the model's default (docs/results.md §5.2): the likelihood's
# max |error| against dopri5 1e-7 in nats per target point; the samples' RMSE against a dopri5 solve of the same
# noise, in model units (kPa, degC, m/s): SAMPLE_RELATIVE_TOLERANCE of the model's own RMSE in each regime where
# that is known (the real-map benchmark; a solver error that small adds at most 0.125% to the RMSE in
# quadrature), else the absolute SAMPLE_TOLERANCE
LL_TOLERANCE = 0.01
SAMPLE_TOLERANCE = {"sp": 1e-3, "t2m": 1e-2, "u10": 1e-2, "v10": 1e-2}
SAMPLE_RELATIVE_TOLERANCE = 0.05


def _sample_cost(key: str) -> float:
    """A sampling solver's key ("euler:8", "midpoint:4") -> its network evaluations (inf for one whose cost is
    not known before the solve: an adaptive one is never a default)."""
    method, _, steps = key.partition(":")
    return NFE_PER_STEP[method] * int(steps) if method in NFE_PER_STEP and steps.isdigit() else float("inf")


def sample_tolerances(regimes: list[str], model_rmse: dict[str, dict[str, float]] | None = None,
                      rel_tol: float = SAMPLE_RELATIVE_TOLERANCE) -> dict[str, dict[str, float]]:
    """{regime: {variable: tolerance in model units}}: rel_tol x the model's RMSE (`model_rmse`: {regime:
    {variable: RMSE in ERA5 units}}, e.g. `real_map_summary`'s) where given, else SAMPLE_TOLERANCE."""
    from ingest.variables import BY_NAME

    out = {}
    for regime in regimes:
        rmse = (model_rmse or {}).get(regime)
        out[regime] = {v: rel_tol * rmse[v] * abs(BY_NAME[v].scale) if rmse and rmse.get(v) else t
                       for v, t in SAMPLE_TOLERANCE.items()}
    return out


def choose_solvers(study: dict[str, Any], ll_tol: float = LL_TOLERANCE,
                   model_rmse: dict[str, dict[str, float]] | None = None,
                   rel_tol: float = SAMPLE_RELATIVE_TOLERANCE) -> dict[str, Any] | None:
    """The model's solver defaults from a bench/ll_solver_error.py JSON: the sampling solver with the fewest
    evaluations whose samples stay within tolerance of dopri5 in every regime (`sample_tolerances`; at equal
    evaluations the likelihood solver if it is one, else the one furthest within it), and the cheapest fixed-step likelihood solver within `ll_tol`
    nats per point of dopri5 in every regime; None for a part nothing meets (the service's global defaults
    then apply). The measurement travels with the choice."""
    names = list(study.get("regimes", {}))
    regimes = study.get("regimes", {})
    if not names:
        return None
    tol = sample_tolerances(names, model_rmse, rel_tol)

    def worst(k: str) -> float:
        """The largest error / tolerance of sampler k over regimes and variables (inf where unmeasured)."""
        return max((regimes[r]["sample_rmse"][k][v] / t if k in regimes[r].get("sample_rmse", {}) else float("inf"))
                   for r in names for v, t in tol[r].items())

    def ok_ll(s: str) -> bool:
        return all(r.get("ll_max_abs_error", {}).get(s, float("inf")) <= ll_tol for r in regimes.values())

    ll_keys = sorted({s for r in regimes.values() for s in r.get("ll_max_abs_error", {})},
                     key=lambda s: sum(r["ll_seconds_per_task"].get(s, float("inf")) for r in regimes.values()))
    ll = next((s for s in ll_keys if ok_ll(s)), None)
    meets = [k for k in {k for r in regimes.values() for k in r.get("sample_rmse", {})}
             if worst(k) <= 1.0 and _sample_cost(k) < float("inf")]
    # at the fewest evaluations: the likelihood solver itself if it qualifies (a request's samples are then
    # scored in the solve that draws them, flownp.inference.one_solve: no separate sampling pass), else the
    # sampler furthest within its tolerance
    sample = min(meets, key=lambda k: (_sample_cost(k), k != ll, worst(k), k)) if meets else None
    one = {k: r["one_solve_ll_max_abs_error"].get(sample) for k, r in regimes.items()
           if sample and sample == ll and "one_solve_ll_max_abs_error" in r}
    return {"sample": sample, "log_likelihood": ll,
            "tolerances": {"log_likelihood_nats_per_point": ll_tol, "sample_rmse_model_units": tol,
                           "sample_rule": (f"{rel_tol:g} x the model's RMSE on the real map" if model_rmse
                                           else "absolute")},
            "measured": {"by": "bench/ll_solver_error.py", "splits": study.get("splits"),
                         "reference": study.get("reference"),
                         "ll_max_abs_error": {k: r["ll_max_abs_error"].get(ll) for k, r in regimes.items()}
                         if ll else None,
                         # the chosen row, or every measured row when none is within the tolerance (the service's
                         # global default then samples, and how far each step count is stays on record)
                         "sample_rmse": {k: r.get("sample_rmse", {}).get(sample) for k, r in regimes.items()}
                         if sample else None,
                         **({} if sample else {"sample_rmse_all": {k: r.get("sample_rmse")
                                                                   for k, r in regimes.items()}}),
                         # the same solver draws and scores: a request's samples are scored in their own solve
                         **({"samples_ll_max_abs_error": one} if one else {})}}


# what a sampler may cost in accuracy to become a model's default: its CRPS over the global ODE's at 100
# midpoint steps (bench/sampling_latency.py, averaged over the 4 variables), the "within 5%"
CRPS_RATIO_TOLERANCE = 1.05


def choose_sampler(study: dict[str, Any], model: str, offered: list[str] | tuple[str, ...],
                   crps_tol: float = CRPS_RATIO_TOLERANCE) -> dict[str, Any] | None:
    """A model's default sampler from a bench/sampling_latency.py JSON: of the rows of `model` (its name in
    the study) whose sampler it offers, the fastest (p50) with a CRPS ratio <= `crps_tol`; None when no row
    qualifies (the kind's natural sampler then applies). The measurement travels with the choice, in the
    form `flownp.samplers.manifest` reads (`default`, `measured`)."""
    rows = [r for r in study.get("rows", []) if r.get("model") == model and r.get("sampler") in offered]
    ok = [r for r in rows if r["crps_ratio"] <= crps_tol]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["p50_s"])
    label = lambda r: f"{r['sampler']} {r['solver'] or str(r['maps']) + ' maps'}"  # noqa: E731
    return {"default": best["sampler"],
            "measured": {"by": "bench/sampling_latency.py", "task": study.get("task"),
                         "reference": study.get("reference", {}).get("solver"), "tolerance": {"crps_ratio": crps_tol},
                         "chosen": label(best),
                         "rows": {label(r): {k: r[k] for k in ("nfe", "p50_s", "p50_ratio", "crps_ratio")}
                                  for r in rows}}}


def pack(run_checkpoint: Path, out: Path, recipe: str, *, trained_on: str = TRAINED_ON,
         description: str | None = None, real_map: dict[str, Any] | None = None,
         solvers: dict[str, Any] | None = None, samplers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Strip a training checkpoint to what serving needs (EMA weights as `model`, no optimizer state),
    save it as `out/default.pt` and write `out/default.json` with its sha256, what it was trained on,
    (`real_map`) its real-ERA5 benchmark figures, (`solvers`, from `choose_solvers`) its measured
    solver defaults and (`samplers`, from `choose_sampler`) its measured default sampler."""
    from flownp.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(run_checkpoint)
    keep = {k: v for k, v in ck.items()
            if k not in ("format", "format_version", "versions", "optimizer", "scheduler", "ema", "model")}
    keep["model"] = ck["ema"] if ck.get("ema") is not None else ck["model"]
    keep["ema"] = None
    ckpt_path, man_path = default_paths(out)
    save_checkpoint(ckpt_path, keep)
    n_params = sum(int(t.numel()) for t in keep["model"].values())
    manifest = {
        "version": VERSION, "synthetic": True,
        "description": description or describe(ck.get("model_config")),
        "file": CHECKPOINT, "sha256": sha256_file(ckpt_path), "bytes": ckpt_path.stat().st_size,
        "n_parameters": n_params, "step": ck.get("step"), "best_val_loss": ck.get("best_val"),
        "model_config": ck.get("model_config"),
        "real_map": real_map,
        "solvers": solvers,
        "samplers": samplers,
        "trained_on": {"data": trained_on,
                       "store_manifest_sha256": ck.get("store_manifest_sha256"),
                       "task_config": ck.get("task_config")},
        "recipe": recipe, "versions": ck.get("versions"),
    }
    with atomic_path(man_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def record_samplers(checkpoint: Path, study: dict[str, Any], model: str, out: Path) -> dict[str, Any]:
    """Copy `checkpoint` to `out` with its default sampler (`samplers`, from `choose_sampler` on the rows of
    `model` in a bench/sampling_latency.py JSON), which the service and the Python API read when no manifest
    records one. ValueError when no offered sampler is within the tolerance (the natural one stays)."""
    from flownp.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from flownp.samplers import offered

    ck = load_checkpoint(checkpoint)
    chosen = choose_sampler(study, model, offered(model_from_checkpoint(ck)))
    if chosen is None:
        raise ValueError(f"no row of {model!r} in the study offers a sampler of this model within CRPS ratio "
                         f"{CRPS_RATIO_TOLERANCE}: nothing recorded (its natural sampler stays the default)")
    save_checkpoint(out, {**{k: v for k, v in ck.items() if k not in ("format", "format_version", "versions")},
                          "samplers": chosen})
    return chosen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flownp.default_model")
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="Pack a training checkpoint as the embedded default model.")
    pk.add_argument("checkpoint", type=Path)
    pk.add_argument("--out", type=Path, default=MODELS_DIR)
    pk.add_argument("--recipe", default="scripts/build_default_model.sh")
    pk.add_argument("--real-map", type=Path, default=None,
                    help="JSON of bench/real_era5.py on this checkpoint: its figures go into the manifest")
    pk.add_argument("--solver-study", type=Path, default=None,
                    help="JSON of bench/ll_solver_error.py on this checkpoint: the solver defaults it supports")
    pk.add_argument("--sampler-study", type=Path, default=None,
                    help="JSON of bench/sampling_latency.py with this checkpoint as --global: its default sampler")
    ch = sub.add_parser("choose-solvers", help="Print the sampling and likelihood solvers a bench/ll_solver_error.py "
                        "JSON supports (`choose_solvers`), as 'SAMPLE LL', for the benchmarks run before `pack`.")
    ch.add_argument("study", type=Path)
    ch.add_argument("--fallback", default="euler:8,midpoint:2",
                    help="SAMPLE,LL used for a part nothing in the study meets (the service's global defaults)")
    ch.add_argument("--real-map", type=Path, default=None,
                    help="JSON of bench/real_era5.py: sample tolerances relative to the model's RMSE there")
    rv = sub.add_parser("record-solvers", help="Rewrite a packed model's manifest `solvers` from a (new) "
                        "bench/ll_solver_error.py JSON, the tolerances relative to the manifest's own real-map RMSE "
                        "(the checkpoint and the rest of the manifest unchanged).")
    rv.add_argument("study", type=Path)
    rv.add_argument("--models", type=Path, default=None, help="the folder of default.json (default: flownp/models)")
    rv.add_argument("--real-map", type=Path, default=None,
                    help="JSON of bench/real_era5.py on this model at the new solvers: replaces `real_map` first")
    rs = sub.add_parser("record-samplers", help="Copy a checkpoint with its default sampler chosen from a "
                        "bench/sampling_latency.py JSON (the `samplers` the service reads).")
    rs.add_argument("checkpoint", type=Path)
    rs.add_argument("--study", type=Path, required=True)
    rs.add_argument("--model", required=True, help="the checkpoint's name in the study (global, lfm, distilled, ...)")
    rs.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "choose-solvers":
        fb_sample, fb_ll = args.fallback.split(",")
        real = real_map_summary(json.loads(args.real_map.read_text())) if args.real_map else None
        got = choose_solvers(json.loads(args.study.read_text()), model_rmse=model_rmse(real)) or {}
        print(got.get("sample") or fb_sample, got.get("log_likelihood") or fb_ll)
        return
    if args.cmd == "record-solvers":
        man_path = default_paths(args.models)[1]
        man = json.loads(man_path.read_text())
        if args.real_map is not None:
            man["real_map"] = real_map_summary(json.loads(args.real_map.read_text()))
        man["solvers"] = choose_solvers(json.loads(args.study.read_text()), model_rmse=model_rmse(man.get("real_map")))
        if man["solvers"] is None:
            raise SystemExit(f"{args.study}: no regimes measured; the manifest is left as it was")
        with atomic_path(man_path) as tmp:
            tmp.write_text(json.dumps(man, indent=2) + "\n")
        print(json.dumps(man["solvers"], indent=2))
        return
    if args.cmd == "record-samplers":
        try:
            chosen = record_samplers(args.checkpoint, json.loads(args.study.read_text()), args.model, args.out)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        print(json.dumps(chosen, indent=2))
        return
    real = None
    if args.real_map is not None:
        real = real_map_summary(json.loads(args.real_map.read_text()))
    solvers = (choose_solvers(json.loads(args.solver_study.read_text()), model_rmse=model_rmse(real))
               if args.solver_study else None)
    samplers = None
    if args.sampler_study:
        from flownp.checkpoint import load_checkpoint, model_from_checkpoint
        from flownp.samplers import offered

        samplers = choose_sampler(json.loads(args.sampler_study.read_text()), "global",
                                  offered(model_from_checkpoint(load_checkpoint(args.checkpoint))))
    print(json.dumps(pack(args.checkpoint, args.out, args.recipe, real_map=real, solvers=solvers,
                          samplers=samplers), indent=2))


def model_rmse(real_map: dict[str, Any] | None) -> dict[str, dict[str, float]] | None:
    """{regime: {variable: RMSE in ERA5 units}} of a `real_map_summary` (a manifest's `real_map`), or None."""
    out = {k: v["rmse"] for k, v in (real_map or {}).items() if isinstance(v, dict) and v.get("rmse")}
    return out or None


def real_map_summary(bench: dict[str, Any]) -> dict[str, Any]:
    """The FlowNP rows of a bench/real_era5.py JSON (RMSE per variable, log-likelihood per point, coverage, in
    ERA5 units) per regime, with the note that it is one map."""
    out: dict[str, Any] = {"note": "ONE real ERA5 map (1995-07-14 12 UTC), evaluation only; bench/real_era5.py",
                           "units": "RMSE Pa (sp), K (t2m), m/s (u10, v10); log-lik nats per target point over "
                                    "ERA5 units"}
    for regime, res in bench.get("regimes", {}).items():
        rows = {k: v for k, v in res.get("era5", {}).items() if k.startswith("FlowNP")}
        if rows:
            r = next(iter(rows.values()))
            out[regime] = {"n_ctx": res.get("n_ctx_range"), "splits": res.get("n_splits"), "rmse": r.get("rmse"),
                           "log_lik": r.get("log_lik"), "cov90": r.get("cov90")}
            gp = res.get("era5", {}).get("GP (fitted)")
            if gp:
                out[regime]["fitted_gp"] = {"rmse": gp.get("rmse"), "log_lik": gp.get("log_lik")}
    return out


if __name__ == "__main__":
    main()
