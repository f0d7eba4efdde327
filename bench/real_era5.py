"""The real-ERA5 benchmark: spatial extrapolation on ONE real ERA5 map (1995-07-14 12 UTC), by which
every model change is judged.

The map (../shared/data/era5/geocat_era5_1995-07-14T12_conus.nc beside the checkout, or --file) is read
with the project's own ingest code (canonicalize -> cut_region -> to_points: the 1245 circle points in
model units kPa, degC, m/s). It is used for EVALUATION ONLY: no model or baseline is ever trained on it;
the GP and IDW baselines fit to each task's own context, as a geostatistician would.

Splits are frozen and seeded: split i of a regime is drawn from numpy's default_rng([seed, regime, i]),
so the first N splits are the same whatever the count. Regimes: dense (n_ctx uniform in 950-1000,
targets = the rest of the circle) and sparse (n_ctx 50-300, targets = the rest). A manifest (the file's
sha256, the seed, per split n_ctx and the sha256 of its point indices) is written the first time and
every later run is refused unless its splits match it, so numbers always name their splits. The default
manifest, bench/real_era5_splits.json, is committed.

Methods: FlowNP checkpoints (--checkpoint, repeatable; --default for the embedded default model of the
service), IDW (16 nearest) and the fitted GP (per-task standardised, fitted hyperparameters with
restarts). FlowNP works in its checkpoint's normalised space; the baselines in the reference
normalisation (both are affine-equivariant: IDW is linear with a leave-one-out spread, the GP
standardises each task's context itself). Every method goes through flownp.jobs.evaluate's
evaluate_predictor on the same tasks with the same sampling seed; all numbers are reported in ERA5
units: sp [Pa], t2m [K], u10 and v10 [m/s], log-likelihood in nats per target point (4 variables summed)
of the density over ERA5-unit values (= the model-unit density's log minus ln(1000), the Jacobian of
kPa -> Pa; degC -> K is a shift).

    python bench/real_era5.py --default                # dense + sparse, 32 splits each, 16 samples
    python bench/real_era5.py --checkpoint RUN/best.pt --default --json out.json
    python bench/real_era5.py --default --quick        # 2 splits, 4 samples (smoke test)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

# BLAS threads spinning on a small shared machine make a 300x300 Cholesky 100x slower; one thread per
# process is the default here (override with the environment, or --threads for torch)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from ingest.io import sha256_file  # noqa: E402
from ingest.layout import canonicalize, check_finite, cut_region, to_points  # noqa: E402
from ingest.normalize import Normalizer  # noqa: E402
from ingest.region import MEMPHIS, Region  # noqa: E402
from ingest.tasks import TaskBatch, gather_tasks  # noqa: E402
from ingest.variables import NAMES, VARIABLES  # noqa: E402

DEFAULT_FILE = REPO.parent / "shared" / "data" / "era5" / "geocat_era5_1995-07-14T12_conus.nc"
DEFAULT_MANIFEST = REPO / "bench" / "real_era5_splits.json"
MANIFEST_KIND = "flownp-weather-real-era5-splits"
REGIMES: dict[str, tuple[int, int]] = {"dense": (950, 1000), "sparse": (50, 300)}
_REGIME_CODE = {"dense": 1, "sparse": 2}
ERA5_UNITS = {v.name: ("K" if v.name == "t2m" else v.era5_units.replace("m s-1", "m/s")) for v in VARIABLES}
# log p over ERA5-unit values = log p over model-unit values + sum_v log|d model / d era5| per point
ERA5_LOG_JACOBIAN = float(sum(math.log(abs(v.scale)) for v in VARIABLES))  # = -ln(1000) (sp: Pa -> kPa)
EVALUATION_ONLY = ("ONE real ERA5 map (evaluation only: never used for training; the baselines fit to "
                   "each task's own context)")
GOAL_TEXT = {"rmse_le_idw": "RMSE <= IDW on every variable", "rmse_le_1.1_gp": "RMSE <= 1.1 x GP on every variable",
             "ll_ge_gp": "log-lik >= GP", "cov90_within_0.05": "|cov90 - 0.9| <= 0.05 on every variable"}


class BenchError(RuntimeError):
    """The benchmark cannot run as asked (missing file, manifest mismatch, bad option)."""


# ---- the map ---------------------------------------------------------------------------------------

def load_map(path: str | Path, region: Region = MEMPHIS) -> tuple[np.ndarray, str]:
    """(P, 4) float64 model units (kPa, degC, m/s) of the circle points, and the map's time (ISO)."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"{path}: the real ERA5 map is not there (../shared/data/era5 beside the checkout, "
                         "or give --file)")
    ds = cut_region(canonicalize(path), region, source=str(path))
    pts = to_points(ds, region)
    if pts.sizes["time"] != 1:
        raise BenchError(f"{path}: holds {pts.sizes['time']} maps; this benchmark is defined on one")
    values = np.asarray(pts.values)
    times = ds["time"].values
    check_finite(values, times, str(path))
    return values[0].astype(np.float64), str(np.datetime_as_string(times[0], unit="m"))


# ---- frozen splits and their manifest -------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    regime: str
    index: int
    n_ctx: int
    perm: np.ndarray  # (P,) int64: context = perm[:n_ctx], targets = perm[n_ctx:]

    @property
    def indices_sha256(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.perm[: self.n_ctx], dtype="<i8").tobytes())
        h.update(b"|")
        h.update(np.ascontiguousarray(self.perm[self.n_ctx:], dtype="<i8").tobytes())
        return h.hexdigest()

    def entry(self) -> dict[str, Any]:
        return {"index": self.index, "n_ctx": self.n_ctx, "n_tgt": int(len(self.perm) - self.n_ctx),
                "indices_sha256": self.indices_sha256}


def make_splits(regime: str, n_splits: int, seed: int, n_points: int) -> list[Split]:
    """The first `n_splits` frozen splits of a regime (split i depends only on seed, regime and i)."""
    lo, hi = REGIMES[regime]
    out = []
    for i in range(n_splits):
        rng = np.random.default_rng([seed, _REGIME_CODE[regime], i])
        n_ctx = int(rng.integers(lo, hi + 1))
        out.append(Split(regime, i, n_ctx, rng.permutation(n_points).astype(np.int64)))
    return out


def build_manifest(file: Path, file_sha: str, seed: int, region: Region,
                   splits: dict[str, list[Split]], map_time: str) -> dict[str, Any]:
    return {
        "kind": MANIFEST_KIND, "file": file.name, "file_sha256": file_sha, "map_time": map_time,
        "seed": seed, "region": region.name, "n_points": region.n_points,
        "split_rule": "split i of a regime: rng = numpy default_rng([seed, regime code (dense 1, sparse 2), i]); "
                      "n_ctx = rng.integers(lo, hi + 1); perm = rng.permutation(n_points); context = perm[:n_ctx], "
                      "targets = perm[n_ctx:]; indices_sha256 = sha256(ctx int64 LE | b'|' | tgt int64 LE)",
        "use": EVALUATION_ONLY,
        "regimes": {r: {"n_ctx_range": list(REGIMES[r]), "splits": [s.entry() for s in ss]}
                    for r, ss in splits.items()},
    }


def check_manifest(have: dict[str, Any], want: dict[str, Any], path: Path) -> None:
    """Refuse (BenchError) unless the splits about to run are exactly those the manifest names."""
    def refuse(what: str) -> None:
        raise BenchError(f"{path}: the manifest does not match this run ({what}); the numbers would not name "
                         "their splits. Run with the manifest's settings, or write a new one with "
                         "--write-manifest (or --manifest OTHER.json)")

    if have.get("kind") != MANIFEST_KIND:
        refuse(f"kind {have.get('kind')!r}, expected {MANIFEST_KIND!r}")
    for key in ("file_sha256", "seed", "region", "n_points"):
        if have.get(key) != want[key]:
            refuse(f"{key} {have.get(key)!r} != {want[key]!r}")
    for regime, w in want["regimes"].items():
        h = have.get("regimes", {}).get(regime)
        if h is None:
            refuse(f"no {regime} regime in it")
        if list(h.get("n_ctx_range", [])) != w["n_ctx_range"]:
            refuse(f"{regime} n_ctx range {h.get('n_ctx_range')} != {w['n_ctx_range']}")
        hs = h.get("splits", [])
        if len(hs) < len(w["splits"]):
            refuse(f"{regime}: it holds {len(hs)} splits, this run asks for {len(w['splits'])}")
        for a, b in zip(hs, w["splits"]):
            if a != b:
                refuse(f"{regime} split {b['index']}: manifest {a} != drawn {b}")


def resolve_manifest(path: Path, want: dict[str, Any], write: bool) -> tuple[dict[str, Any], str]:
    """Write the manifest if asked or absent; else check this run against it. Returns (manifest, note)."""
    if write or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=1) + "\n")
        return want, f"wrote {path}"
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: unreadable manifest ({exc})") from exc
    check_manifest(have, want, path)
    return have, f"checked against {path}"


def task_batch(values_norm: np.ndarray, xy: np.ndarray, split: Split) -> TaskBatch:
    """One task (batch of 1) in the normalised space the values are given in."""
    return gather_tasks(values_norm[None].astype(np.float32), xy, np.zeros(1, dtype=np.int64), split.perm[None],
                        split.n_ctx, None)


# ---- methods ---------------------------------------------------------------------------------------

@dataclass
class Method:
    label: str
    predictor: Any
    normalizer: Normalizer
    kind: str            # "flownp" or "baseline"
    info: dict[str, Any]


def flownp_method(ck: dict[str, Any], label: str, info: dict[str, Any], args: argparse.Namespace) -> Method:
    from flownp.checkpoint import model_from_checkpoint
    from flownp.jobs.evaluate import FlowNPPredictor, parse_solver

    region = Region.from_dict(ck["region"]) if ck.get("region") else MEMPHIS
    if region.n_points != MEMPHIS.n_points or region.name != MEMPHIS.name:
        raise BenchError(f"{label}: trained on region {region.name} ({region.n_points} points), not "
                         f"{MEMPHIS.name}")
    model = model_from_checkpoint(ck).to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    pred = FlowNPPredictor(model, parse_solver(args.ll_solver), parse_solver(args.solver), args.estimator,
                           args.n_probes, args.seed, name=label)
    info = {**info, "kind": ck.get("kind"), "step": ck.get("step"),
            "n_parameters": int(sum(p.numel() for p in model.parameters()))}
    return Method(label, pred, Normalizer.from_dict(ck["normalizer"]), "flownp", info)


def default_method(args: argparse.Namespace) -> Method:
    """The embedded default model, found and verified (sha256 against its manifest) as the service does."""
    from flownp.default_model import default_paths
    from flownp.inference import default_checkpoint

    ck, digest, man = default_checkpoint()
    info = {"source": "embedded default model (flownp/models)", "path": str(default_paths()[0]),
            "sha256": digest, "version": man.get("version"), "synthetic": bool(man.get("synthetic"))}
    return flownp_method(ck, f"FlowNP default ({man.get('version', 'default')})", info, args)


def checkpoint_method(path: str, args: argparse.Namespace, taken: set[str]) -> Method:
    from flownp.checkpoint import load_checkpoint

    p = Path(path)
    try:
        ck = load_checkpoint(p)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BenchError(f"{p}: cannot load the checkpoint ({exc})") from exc
    label = f"FlowNP {p.parent.name}/{p.name}" if p.parent.name else f"FlowNP {p.name}"
    while label in taken:
        label += "'"
    return flownp_method(ck, label, {"source": "checkpoint", "path": str(p), "sha256": sha256_file(p)}, args)


def baseline_methods(names: list[str], args: argparse.Namespace) -> list[Method]:
    from flownp.jobs.baselines.gp import FittedGPPredictor
    from flownp.jobs.baselines.idw import IDWPredictor

    ref = Normalizer.reference()
    out = []
    for n in names:
        if n == "idw":
            out.append(Method("IDW", IDWPredictor(k=16), ref, "baseline", {"source": "baseline"}))
        elif n == "gp":
            out.append(Method("GP (fitted)", FittedGPPredictor(max_fit_points=args.gp_fit_points, seed=args.seed),
                              ref, "baseline", {"source": "baseline"}))
        else:
            raise BenchError(f"unknown baseline {n!r}; choose from idw, gp")
    return out


# ---- metrics in ERA5 units ------------------------------------------------------------------------

def to_era5(res: dict[str, Any]) -> dict[str, Any]:
    """ERA5-unit metrics from an evaluate_predictor result (model units kPa, degC, m/s inside)."""
    scale = {v.name: abs(v.scale) for v in VARIABLES}
    out: dict[str, Any] = {
        "log_lik": res["tar_ll_physical"] + ERA5_LOG_JACOBIAN,
        "log_lik_stderr": res["tar_ll_stderr"],
        "log_lik_model_units": res["tar_ll_physical"],
        "log_lik_normalised": res["tar_ll"],
        "ll_kind": res["predictor"]["ll_kind"],
        # per split, in split order (one task per batch): a paired difference between two models run on the
        # same splits has a far smaller error than the difference of their across-split standard errors
        "log_lik_per_split": [x + res["tar_ll_physical"] - res["tar_ll"] + ERA5_LOG_JACOBIAN
                              for x in res.get("tar_ll_tasks", [])],
    }
    if "rmse" in res:
        out["rmse"] = {n: res["rmse"][n] / scale[n] for n in NAMES}
        out["crps"] = {n: res["crps"][n] / scale[n] for n in NAMES}
        out["cov50"] = dict(res["coverage50"])
        out["cov90"] = dict(res["coverage90"])
    return out


def compare(era5: dict[str, dict[str, Any]], methods: list[Method]) -> dict[str, dict[str, Any]]:
    """Ratios to the fitted GP and the goals, for every method that is not a reference itself."""
    gp, idw = era5.get("GP (fitted)"), era5.get("IDW")
    out = {}
    for m in methods:
        e = era5[m.label]
        c: dict[str, Any] = {}
        if gp is not None and "rmse" in e and "rmse" in gp:
            c["rmse_ratio_to_gp"] = {n: e["rmse"][n] / gp["rmse"][n] for n in NAMES}
        if gp is not None:
            c["log_lik_minus_gp"] = e["log_lik"] - gp["log_lik"]
        if m.label not in ("GP (fitted)", "IDW") and "rmse" in e:
            goals: dict[str, bool | None] = {
                "rmse_le_idw": all(e["rmse"][n] <= idw["rmse"][n] for n in NAMES) if idw else None,
                "rmse_le_1.1_gp": all(e["rmse"][n] <= 1.1 * gp["rmse"][n] for n in NAMES) if gp else None,
                "ll_ge_gp": e["log_lik"] >= gp["log_lik"] if gp else None,
                "cov90_within_0.05": all(abs(e["cov90"][n] - 0.9) <= 0.05 for n in NAMES),
            }
            c["goals"] = goals
            c["all_goals"] = all(g is True for g in goals.values())
        out[m.label] = c
    return out


# ---- printing --------------------------------------------------------------------------------------

def _fmt(x: float | None, d: int = 3) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{d}f}"


def print_tables(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for regime, r in result["regimes"].items():
        lo, hi = REGIMES[regime]
        title = (f"{regime}: n_ctx {lo}-{hi}, targets = rest of the 1245-point circle; {r['n_splits']} frozen "
                 f"splits, {result['options']['samples']} samples; ERA5 units")
        t = Table(title=title, title_justify="left")
        t.add_column("method")
        for n in NAMES:
            t.add_column(f"RMSE {n} [{ERA5_UNITS[n]}]", justify="right")
        for n in NAMES:
            t.add_column(f"CRPS {n} [{ERA5_UNITS[n]}]", justify="right")
        t.add_column("cov50 sp/t2m/u/v", justify="right")
        t.add_column("cov90 sp/t2m/u/v", justify="right")
        t.add_column("log-lik [nats/pt]", justify="right")
        for label, e in r["era5"].items():
            if "rmse" in e:
                row = [_fmt(e["rmse"]["sp"], 1)] + [_fmt(e["rmse"][n], 3) for n in NAMES[1:]]
                row += [_fmt(e["crps"]["sp"], 1)] + [_fmt(e["crps"][n], 3) for n in NAMES[1:]]
                row += [" ".join(f"{e['cov50'][n]:.2f}" for n in NAMES), " ".join(f"{e['cov90'][n]:.2f}" for n in NAMES)]
            else:
                row = ["-"] * 10
            se = e.get("log_lik_stderr")
            row.append(_fmt(e["log_lik"], 3) + (f" ±{se:.3f}" if se is not None else ""))
            t.add_row(label, *row)
        console.print(t)
        c = Table(title=f"{regime}: relative to the fitted GP, and the goals", title_justify="left")
        c.add_column("method")
        for n in NAMES:
            c.add_column(f"RMSE/GP {n}", justify="right")
        c.add_column("log-lik - GP", justify="right")
        for g in GOAL_TEXT:
            c.add_column(g, justify="center")
        for label, cm in r["compare"].items():
            ratios = cm.get("rmse_ratio_to_gp")
            row = [_fmt(ratios[n], 3) if ratios else "-" for n in NAMES]
            row.append(_fmt(cm.get("log_lik_minus_gp"), 3))
            goals = cm.get("goals")
            row += [("-" if not goals or goals[g] is None else ("yes" if goals[g] else "NO")) for g in GOAL_TEXT]
            c.add_row(label, *row)
        console.print(c)
    console.print("goals: " + "; ".join(f"{k} = {v}" for k, v in GOAL_TEXT.items()))
    console.print(f"data: {result['file']} ({result['map_time']} UTC), {EVALUATION_ONLY}.")
    console.print("units: RMSE/CRPS in Pa (sp), K (t2m), m/s (u10, v10); log-lik in nats per target point, 4 "
                  "variables summed, of the density over ERA5-unit values (model-unit kPa/degC value - ln 1000); "
                  "± is the standard error over splits. ll kinds: FlowNP joint over targets; GP joint over points, "
                  "independent variables; IDW a sum of Gaussian marginals. Coverage is rank coverage of the central "
                  "90% / 50% intervals (flownp.scores: exactly nominal in expectation for calibrated samples at "
                  "any sample count S; the empirical 5-95% quantile interval of S true draws covers only about "
                  "(S-1)/(S+1)).")
    console.print(f"splits: {result['manifest_note']} (file sha256 {result['manifest']['file_sha256'][:12]}..., "
                  f"seed {result['manifest']['seed']})")


# ---- the run ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/real_era5.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the real ERA5 map (netCDF)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PATH", help="a FlowNP checkpoint (repeatable)")
    p.add_argument("--default", action="store_true", help="the embedded default model the service ships")
    p.add_argument("--baselines", default="idw,gp", help="comma-separated: idw, gp (or 'none')")
    p.add_argument("--regime", choices=("dense", "sparse", "both"), default="both")
    p.add_argument("--splits", type=int, default=None, help="splits per regime (default 32; --quick 2)")
    p.add_argument("--samples", type=int, default=None, help="samples per task (default 16; --quick 4)")
    p.add_argument("--solver", default="euler:16", help="FlowNP sampling solver")
    p.add_argument("--ll-solver", default=None, help="FlowNP likelihood solver (default midpoint:100; --quick midpoint:20)")
    p.add_argument("--estimator", default="auto", help="FlowNP divergence: auto, exact, exact-blocks, exact-full, hutchinson")
    p.add_argument("--n-probes", type=int, default=1, help="Hutchinson probes")
    p.add_argument("--gp-fit-points", type=int, default=300, help="context points the GP fits its hyperparameters on")
    p.add_argument("--seed", type=int, default=0, help="split and sampling seed")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="split manifest (checked; written if absent)")
    p.add_argument("--write-manifest", action="store_true", help="(over)write the manifest with this run's splits")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write everything as JSON")
    p.add_argument("--quick", action="store_true", help="2 splits, 4 samples, a short likelihood solve (tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a small shared machine: measured 10x over 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    a.splits = a.splits if a.splits is not None else (2 if a.quick else 32)
    a.samples = a.samples if a.samples is not None else (4 if a.quick else 16)
    a.ll_solver = a.ll_solver or ("midpoint:20" if a.quick else "midpoint:100")
    if a.splits < 1 or a.samples < 2:
        p.error("need --splits >= 1 and --samples >= 2 (coverage and CRPS need two samples)")
    return a


def _shown(path: Path) -> str:
    """A path as results show it: relative to the checkout's parent when under it (results committed to the
    repository carry no machine paths)."""
    p = Path(path).resolve()
    for base, prefix in ((REPO.resolve(), ""), (REPO.parent.resolve(), "../")):
        try:
            return prefix + str(p.relative_to(base))
        except ValueError:
            continue
    return str(path)


def run(args: argparse.Namespace, console: Any = None) -> dict[str, Any]:
    """The benchmark (no gradients, `args.threads` torch threads; both restored afterwards, so a caller's
    process, e.g. a test session, is left as it was)."""
    import torch

    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            if args.threads > 0:
                torch.set_num_threads(args.threads)
            return _run(args, console)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, console: Any = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from flownp.jobs.evaluate import evaluate_predictor

    t0 = time.time()
    file = Path(args.file)
    phys, map_time = load_map(file)
    file_sha = sha256_file(file)
    regimes = ["dense", "sparse"] if args.regime == "both" else [args.regime]
    splits = {r: make_splits(r, args.splits, args.seed, MEMPHIS.n_points) for r in regimes}
    want = build_manifest(file, file_sha, args.seed, MEMPHIS, splits, map_time)
    manifest, note = resolve_manifest(Path(args.manifest), want, args.write_manifest)

    methods: list[Method] = []
    if args.default:
        methods.append(default_method(args))
    for c in args.checkpoint:
        methods.append(checkpoint_method(c, args, {m.label for m in methods}))
    names = [] if args.baselines.strip() in ("", "none") else [b.strip() for b in args.baselines.split(",")]
    methods += baseline_methods(names, args)
    if not methods:
        raise BenchError("nothing to evaluate: give --default, --checkpoint PATH or baselines")

    xy = MEMPHIS.circle_xy
    result: dict[str, Any] = {
        "benchmark": "real-era5", "file": _shown(file), "file_sha256": file_sha, "map_time": map_time,
        "use": EVALUATION_ONLY, "region": MEMPHIS.name, "n_points": MEMPHIS.n_points,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "units": {"rmse": dict(ERA5_UNITS), "crps": dict(ERA5_UNITS),
                  "log_lik": "nats per target point, 4 variables summed, density over ERA5-unit values "
                             "(sp Pa, t2m K, u10/v10 m/s) = model units (kPa, degC, m/s) value - ln(1000)",
                  "era5_log_jacobian_per_point": ERA5_LOG_JACOBIAN},
        "goals": GOAL_TEXT,
        "methods": {m.label: {**m.info, "normaliser": m.normalizer.to_dict(),
                              "space": "checkpoint normaliser" if m.kind == "flownp" else "reference normaliser"}
                    for m in methods},
        "manifest": manifest, "manifest_path": _shown(Path(args.manifest)), "manifest_note": note,
        "regimes": {},
    }
    for regime in regimes:
        raw: dict[str, Any] = {}
        for m in tqdm(methods, desc=f"{regime} methods", disable=args.quiet, leave=False):
            values = m.normalizer.normalize(phys)
            batches = [task_batch(values, xy, s) for s in splits[regime]]
            ts = time.time()
            res = evaluate_predictor(m.predictor, batches, m.normalizer, n_samples=args.samples, seed=args.seed,
                                     progress=not args.quiet)
            res["seconds"] = time.time() - ts
            raw[m.label] = res
        era5 = {label: to_era5(res) for label, res in raw.items()}
        result["regimes"][regime] = {
            "n_ctx_range": list(REGIMES[regime]), "n_splits": len(splits[regime]),
            "n_ctx": [s.n_ctx for s in splits[regime]],
            "era5": era5, "compare": compare(era5, methods), "evaluate_predictor": raw,
        }
    result["seconds"] = time.time() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 230)
    try:
        result = run(args, console)
        result["command"] = "python bench/real_era5.py " + " ".join(sys.argv[1:] if argv is None else argv)
    except BenchError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    print_tables(result, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
