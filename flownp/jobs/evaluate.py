"""Evaluation on a frozen set of tasks: tar_ll (as the protocol defines it, and with the exact trace
where the model allows it), RMSE of the sample mean, CRPS and interval coverage in physical units, the
oracle's tar_ll on synthetic data and the gap to it. Every predictor (FlowNP and the baselines) goes
through the same code on the same batches.

Units (docs/protocol.md §4, §6): log-likelihoods in nats per target point (4 variables summed) over
normalised values (`tar_ll`), over ERA5 units Pa, K, m s-1 (`tar_ll_era5`: what the registry gate, REST and
the notebook report) and over model units kPa, degC, m s-1 (`tar_ll_physical`, the oracle's scale); each
result names them in `ll_units`. RMSE and CRPS per variable in kPa, degC, m/s.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np
import torch

from flownp.core.likelihood import log_likelihood, resolve_estimator
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig
from flownp.inference import parse_solver
from flownp.scores import crps_from_samples, quantile_interval_coverage, rank_coverage
from ingest.normalize import Normalizer
from ingest.space import UNITS, log_jacobian, model_units
from ingest.tasks import TaskBatch
from ingest.variables import NAMES

__all__ = ["crps_from_samples", "evaluate_predictor", "gaussian_fit_log_score"]

COVERAGE_KIND = ("coverage50/90: rank coverage (flownp.scores.rank_coverage; exact in expectation for a calibrated "
                 "predictor at any sample count); coverage90_quantile_interval: the empirical 5-95% interval of "
                 "the samples, biased low for few samples (about (S - 1) / (S + 1))")


class Predictor(Protocol):
    """What `evaluate_predictor` needs. log_likelihood: (B,) nats of the whole target set of each
    task, normalised units; `ll_kind` says if that is a joint density or a sum of per-point marginals."""

    name: str
    ll_kind: str

    def log_likelihood(self, batch: TaskBatch) -> torch.Tensor: ...

    def sample(self, batch: TaskBatch, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class FlowNPPredictor:
    """A FlowNP model with its likelihood and sampling solvers."""

    model: Any
    ll_solver: SolverConfig = field(default_factory=lambda: SolverConfig("midpoint", 100))
    sample_solver: SolverConfig = field(default_factory=lambda: SolverConfig("euler", 16))
    estimator: str = "hutchinson"
    n_probes: int = 1
    seed: int = 0
    name: str = "FlowNP"
    ll_kind: str = "joint"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def log_likelihood(self, batch: TaskBatch) -> torch.Tensor:
        b = batch.to(self.device)
        res = log_likelihood(self.model, b.xc, b.yc, b.xt, b.yt, solver=self.ll_solver,
                             estimator=self.estimator, n_probes=self.n_probes,
                             seed=batch_probe_seed(self.seed, batch))
        return res.joint.cpu()

    def sample(self, batch: TaskBatch, n: int, generator: torch.Generator) -> torch.Tensor:
        b = batch.to(self.device)
        return sample(self.model, b.xc, b.yc, b.xt, n_samples=n, solver=self.sample_solver,
                      generator=generator).samples.cpu()

    def describe(self) -> dict[str, Any]:
        est = resolve_estimator(self.model.config.targets == "independent", self.estimator)
        return {"name": self.name, "ll_kind": self.ll_kind, "estimator": est, "n_probes": self.n_probes,
                "probe_seed": self.seed, "probe_seeds": "per batch: batch_probe_seed(probe_seed, batch)",
                "ll_solver": self.ll_solver.describe(),
                "sample_solver": self.sample_solver.describe(), "model": self.model.config.to_dict()}


def batch_probe_seed(seed: int, batch: TaskBatch) -> int:
    """The Hutchinson probe seed of one batch: a function of `seed` and the batch's tasks (their maps and
    target points), so every batch draws its own probes (a single seed for all batches correlates their
    estimator errors: the mean over batches would not average them out) while the same task set, e.g. with a
    corrupted context, keeps its probes (paired comparisons)."""
    key = zlib.crc32(batch.map_index.cpu().numpy().astype(np.int64).tobytes())
    key = zlib.crc32(batch.tgt_index.cpu().numpy().astype(np.int64).tobytes(), key)
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


@dataclass
class _Acc:
    ll_tasks: list[float] = field(default_factory=list)
    ll_batch_means: list[float] = field(default_factory=list)
    sse: np.ndarray = field(default_factory=lambda: np.zeros(4))
    crps: np.ndarray = field(default_factory=lambda: np.zeros(4))
    cover50: np.ndarray = field(default_factory=lambda: np.zeros(4))
    cover90: np.ndarray = field(default_factory=lambda: np.zeros(4))
    cover90_interval: np.ndarray = field(default_factory=lambda: np.zeros(4))
    count: int = 0
    gauss_batch_means: list[float] = field(default_factory=list)


def gaussian_fit_log_score(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """log N(truth; mean, std^2) summed over variables, with mean and unbiased std of the samples per target
    point and variable (the TNP-pytorch convention). samples (B, S, n, D), truth (B, n, D) -> (B, n) nats."""
    mu, sd = samples.mean(1), samples.std(1)
    z = (truth - mu) / sd
    return (-0.5 * z.pow(2) - sd.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def evaluate_predictor(pred: Predictor, batches: Iterable[TaskBatch], normalizer: Normalizer, *,
                       n_samples: int = 16, seed: int = 0, progress: bool = False,
                       gauss_samples: int = 0) -> dict[str, Any]:
    """Metrics of one predictor over batches (normalised tasks). n_samples = 0 skips sample metrics;
    gauss_samples > 0 adds the Gaussian-fit score `gauss_ll` of that many samples (the sample metrics' own
    samples when the counts are equal, else a separate draw, so the sample metrics do not change)."""
    from tqdm.auto import tqdm

    acc = _Acc()
    mean = torch.tensor(normalizer.mean, dtype=torch.float32)
    std = torch.tensor(normalizer.std, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    gauss_gen = torch.Generator().manual_seed(seed + 1)
    can_sample = getattr(pred, "can_sample", True)
    for batch in tqdm(list(batches), desc=f"evaluate {pred.name}", disable=not progress):
        ll = pred.log_likelihood(batch).detach().double() / batch.xt.shape[1]
        acc.ll_tasks += ll.tolist()
        acc.ll_batch_means.append(float(ll.mean()))
        raw = pred.sample(batch, n_samples, gen).float() if n_samples and can_sample else None
        if gauss_samples and can_sample:
            g = raw if gauss_samples == n_samples else pred.sample(batch, gauss_samples, gauss_gen).float()
            acc.gauss_batch_means.append(float(gaussian_fit_log_score(g.double(), batch.yt.double()).mean()))
        if raw is not None:
            smp = raw * std + mean  # physical units
            truth = batch.yt.float() * std + mean
            err = smp.mean(1) - truth
            acc.sse += err.pow(2).sum((0, 1)).double().numpy()
            acc.crps += crps_from_samples(smp, truth).sum((0, 1)).double().numpy()
            acc.cover50 += rank_coverage(smp, truth, 0.5).sum((0, 1)).double().numpy()
            acc.cover90 += rank_coverage(smp, truth, 0.9).sum((0, 1)).double().numpy()
            acc.cover90_interval += quantile_interval_coverage(smp, truth, 0.9).sum((0, 1)).double().numpy()
            acc.count += truth.shape[0] * truth.shape[1]
    ll = np.array(acc.ll_tasks)
    out: dict[str, Any] = {
        "predictor": pred.describe(),
        "n_tasks": len(ll),
        "tar_ll": float(np.mean(acc.ll_batch_means)),
        "tar_ll_task_mean": float(ll.mean()),
        "tar_ll_tasks": [float(x) for x in ll],  # per task, in batch order (paired comparisons across models)
        "tar_ll_stderr": float(ll.std(ddof=1) / math.sqrt(len(ll))) if len(ll) > 1 else None,
        "tar_ll_era5": float(np.mean(acc.ll_batch_means)) + log_jacobian(normalizer, "era5"),
        "tar_ll_physical": float(np.mean(acc.ll_batch_means)) + log_jacobian(normalizer, "model"),
        "tar_ll_units": f"nats per target point, 4 variables summed, normalised ({pred.ll_kind}); "
                        "tar_ll is the mean of batch means (protocol); tar_ll_era5 and tar_ll_physical are the "
                        "same over other units (docs/protocol.md §6)",
        "ll_units": {"tar_ll": UNITS["normalised"], "tar_ll_era5": UNITS["era5"], "tar_ll_physical": UNITS["model"]},
    }
    if acc.count:
        n = acc.count
        out.update({
            "n_samples": n_samples,
            "rmse": dict(zip(NAMES, np.sqrt(acc.sse / n).tolist())),
            "crps": dict(zip(NAMES, (acc.crps / n).tolist())),
            "coverage50": dict(zip(NAMES, (acc.cover50 / n).tolist())),
            "coverage90": dict(zip(NAMES, (acc.cover90 / n).tolist())),
            "coverage90_quantile_interval": dict(zip(NAMES, (acc.cover90_interval / n).tolist())),
            "coverage_kind": COVERAGE_KIND,
            "units": model_units(),
        })
    if acc.gauss_batch_means:
        g = float(np.mean(acc.gauss_batch_means))
        out.update({
            "gauss_ll": g, "gauss_ll_era5": g + log_jacobian(normalizer, "era5"), "gauss_ll_samples": gauss_samples,
            "gauss_ll_units": f"nats per target point, 4 variables summed, normalised (gauss_ll_era5: ERA5 units); "
                              f"the truth's log density under a Gaussian per target point and variable fitted to "
                              f"{gauss_samples} samples (mean, unbiased std; TNP-pytorch convention): a marginal "
                              "score of the sampler, not the model's joint density; mean of batch means",
        })
    return out


# ---- the evaluation job ------------------------------------------------------------------------

def eval_tasks(store: Any, split: str, *, eval_set: str | None = None, n_tasks: int | None = 32,
               n_ctx: tuple[int, int] = (950, 1000), seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray]:
    """(EvalSet, store times, normalised values) of a split: a saved set, or one drawn (seeded) now."""
    from ingest.tasks import load_eval_set, make_eval_set

    times, values = store.load(split)
    if eval_set:
        es = load_eval_set(eval_set)
        if es.meta.get("split") != split:
            raise ValueError(f"evaluation set {eval_set} is of split {es.meta.get('split')!r}, not {split!r}")
    else:
        es = make_eval_set(times, store.region.n_points, split=split,
                           n_tasks=None if n_tasks is None else min(n_tasks, len(times)),
                           n_ctx_min=n_ctx[0], n_ctx_max=n_ctx[1], seed=seed,
                           extra={"store_manifest_sha256": store.manifest_sha256})
    return es, times, values


def evaluate_checkpoint(checkpoint: str, data: str, *, split: str = "test", eval_set: str | None = None,
                        n_tasks: int | None = 32, n_ctx: tuple[int, int] = (950, 1000), seed: int = 0,
                        batch_size: int = 8, n_samples: int = 16, ll_solver: str = "midpoint:100",
                        sample_solver: str = "euler:16", n_probes: int = 1, exact: bool = True,
                        oracle: bool = True, baselines: tuple[str, ...] = (), plot: str | None = None,
                        plot_index: int = 0, progress: bool = True, device: str = "cpu",
                        context_noise: tuple[str, ...] = (), sweep: tuple[int, ...] = (),
                        sweep_samples: int = 4, also_ll_solvers: tuple[str, ...] = (),
                        gauss_samples: int = 0) -> dict[str, Any]:
    """The `flownp evaluate` job: metrics of a checkpoint (and optionally the oracle and baselines) on
    a frozen evaluation set; `tar_ll_by_solver` holds the likelihood at `ll_solver` (the primary, which
    `tar_ll` and every comparison use) and at each of `also_ll_solvers`, one labelled entry per solver, never
    averaged together; `gauss_samples` > 0 adds the Gaussian-fit score `gauss_ll` (FlowNP and the oracle);
    with `context_noise` the same metrics on corrupted contexts and their drop,
    with `sweep` the Euler-K sample error against a dopri5 solve; with `plot` a PNG of task `plot_index` of
    the evaluation set (in the set's order). Returns a JSON-serialisable dict."""
    from flownp.checkpoint import load_checkpoint, model_from_checkpoint
    from flownp.jobs.robustness import corrupted, parse_noise, robustness_summary, steps_sweep
    from ingest.store import Store

    for spec in context_noise:
        parse_noise(spec)  # refuse a bad spec before any work
    if any(k < 1 for k in sweep):
        raise ValueError(f"steps sweep needs positive step counts, got {sweep}")
    solvers = {spec: parse_solver(spec) for spec in (ll_solver, *also_ll_solvers)}  # refuse a bad spec now
    if gauss_samples == 1 or gauss_samples < 0:
        raise ValueError("gauss_samples must be 0 (off) or >= 2 (a std needs two samples)")

    store = Store.open(data)
    ck = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ck).to(device)
    normalizer = Normalizer.from_dict(ck["normalizer"])
    if normalizer != store.normalizer:
        # the model's own normalisation is what its numbers mean; say so when the store's differs
        store_note = "store normaliser differs from the checkpoint's; the checkpoint's is used"
    else:
        store_note = "same normaliser as the store"
    es, times, _ = eval_tasks(store, split, eval_set=eval_set, n_tasks=n_tasks, n_ctx=n_ctx, seed=seed)
    if plot_index != 0 and not plot:
        raise ValueError("--plot-task chooses the task of --plot: give --plot PATH too")
    if not 0 <= plot_index < len(es):
        raise ValueError(f"--plot-task {plot_index} is out of range: the evaluation set holds {len(es)} tasks "
                         f"(indices 0 to {len(es) - 1})")
    _, phys = store.load(split, normalized=False)
    values = normalizer.normalize(phys).astype(np.float32)
    xy = store.region.circle_xy
    batches = lambda: es.batches(values, xy, times, batch_size)  # noqa: E731
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "store": str(data), "split": split, "eval_set": es.meta,
        "normaliser": normalizer.to_dict(), "normaliser_note": store_note,
        "float16_parity": False,
    }
    pred = FlowNPPredictor(model, solvers[ll_solver], parse_solver(sample_solver), "hutchinson",
                           n_probes, seed)
    result["flownp"] = evaluate_predictor(pred, batches(), normalizer, n_samples=n_samples, seed=seed,
                                          progress=progress, gauss_samples=gauss_samples)
    result["tar_ll_by_solver"] = {ll_solver: ll_entry(result["flownp"], primary=True)}
    for spec in also_ll_solvers:
        if spec in result["tar_ll_by_solver"]:
            continue
        other = dataclasses.replace(pred, ll_solver=solvers[spec])
        result["tar_ll_by_solver"][spec] = ll_entry(evaluate_predictor(other, batches(), normalizer, n_samples=0,
                                                                       progress=progress), primary=False)
    if exact and model.config.targets == "independent":
        ex = FlowNPPredictor(model, parse_solver(ll_solver), parse_solver(sample_solver), "auto", 1, seed,
                             name="FlowNP (exact trace)")
        result["flownp_exact"] = evaluate_predictor(ex, batches(), normalizer, n_samples=0, progress=progress)
    gp = synthetic_law(store)
    syn = store.manifest.get("synthetic") or {}
    if oracle and (gp is not None or syn.get("kind") == "broad_prior"):
        from flownp.jobs.baselines.oracle import OraclePredictor, PriorOraclePredictor

        orc = (OraclePredictor(gp, normalizer) if gp is not None
               else PriorOraclePredictor.from_law(syn, times, normalizer))
        result["oracle"] = evaluate_predictor(orc, batches(), normalizer, n_samples=n_samples, seed=seed,
                                              progress=progress, gauss_samples=gauss_samples)
        result["gap_to_oracle"] = result["oracle"]["tar_ll"] - result["flownp"]["tar_ll"]
    for b in baselines:
        p = make_baseline(b)
        result[baseline_key(b)] = evaluate_predictor(p, batches(), normalizer, n_samples=n_samples, seed=seed,
                                                     progress=progress)
    if context_noise:
        result["robustness"] = {}
        for spec in context_noise:
            noisy = evaluate_predictor(pred, corrupted(batches(), spec, seed), normalizer, n_samples=n_samples,
                                       seed=seed, progress=progress)
            result["robustness"][spec] = robustness_summary(result["flownp"], noisy)
    if sweep:
        result["steps_sweep"] = steps_sweep(model, batches(), normalizer, tuple(sweep), n_samples=sweep_samples,
                                            seed=seed)
    if plot:
        from ingest.tasks import gather_tasks

        i = plot_index  # task i of the set itself (batches() regroups the tasks by context size)
        one = gather_tasks(values, xy, es.map_index(times)[[i]], es.perm[[i]].astype(np.int64), int(es.n_ctx[i]),
                           es.meta.get("n_tgt"))
        when = str(es.times[i].astype("datetime64[s]"))
        plot_task(model, one, normalizer, store.region, plot, solver=parse_solver(sample_solver), seed=seed,
                  label=f"task {i} of the evaluation set ({when})")
        result["plot"] = plot
        result["plot_task"] = {"index": i, "time": when, "n_ctx": int(es.n_ctx[i])}
    return result


def ll_entry(res: dict[str, Any], primary: bool) -> dict[str, Any]:
    """One solver's likelihood from an evaluate_predictor result, labelled with its solver and estimator."""
    p = res["predictor"]
    return {"tar_ll": res["tar_ll"], "tar_ll_stderr": res["tar_ll_stderr"], "tar_ll_era5": res["tar_ll_era5"],
            "ll_solver": p["ll_solver"], "estimator": p["estimator"], "n_probes": p["n_probes"],
            "primary": primary, "units": res["tar_ll_units"]}


def baseline_key(spec: str) -> str:
    """The result key of a baseline spec: 'idw', 'gp', 'cnp:RUN/best.pt' -> 'cnp'."""
    return spec.split(":", 1)[0]


def make_baseline(spec: str) -> Any:
    """A baseline predictor from its spec: 'idw', 'gp', or 'cnp:CKPT' / 'tnpa:CKPT' (a checkpoint of
    `flownp train-baseline`)."""
    name, _, path = spec.partition(":")
    if name in ("cnp", "tnpa"):
        if not path:
            raise ValueError(f"baseline {name!r} needs its checkpoint: '{name}:PATH'")
        from flownp.jobs.baselines.neural import load_baseline

        pred = load_baseline(path)
        if pred.model.config.kind != name:
            raise ValueError(f"{path} holds a {pred.model.config.kind}, not a {name}")
        return pred
    if name == "idw":
        from flownp.jobs.baselines.idw import IDWPredictor

        return IDWPredictor()
    if name == "gp":
        from flownp.jobs.baselines.gp import FittedGPPredictor

        return FittedGPPredictor()
    raise ValueError(f"unknown baseline {spec!r}; choose from idw, gp, cnp:CKPT, tnpa:CKPT")


def synthetic_law(store: Any) -> Any:
    """The GP-weather law a synthetic store was generated from (None for real data)."""
    syn = store.manifest.get("synthetic")
    if not syn or syn.get("kind", "gp_weather") != "gp_weather":
        return None  # real data, or per-map laws (broad prior: PriorOraclePredictor.from_store)
    from ingest.region import Region
    from ingest.synthetic import GPWeather, GPWeatherConfig

    return GPWeather(GPWeatherConfig.from_dict(syn["config"]), Region.from_dict(syn["region"]))


def plot_task(model: Any, batch: TaskBatch, normalizer: Normalizer, region: Any, path: str, *,
              solver: SolverConfig, n_samples: int = 16, seed: int = 0, label: str = "one task") -> None:
    """PNG: per variable (rows) truth, sample mean, sample std and one sample (columns) on the circle,
    context locations marked, first task of the batch, physical units; `label` names the task in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = TaskBatch(*(getattr(batch, f)[:1] for f in batch.__dataclass_fields__))
    dev = next(model.parameters()).device
    smp = sample(model, one.xc.to(dev), one.yc.to(dev), one.xt.to(dev), n_samples=n_samples, solver=solver,
                 generator=torch.Generator().manual_seed(seed)).samples[0].cpu().numpy()
    den = normalizer.denormalize
    xy = region.circle_xy
    truth_all = np.zeros((len(xy), 4))
    truth_all[one.ctx_index[0].numpy()] = den(one.yc[0].numpy())
    truth_all[one.tgt_index[0].numpy()] = den(one.yt[0].numpy())
    xt, xc = one.xt[0].numpy(), one.xc[0].numpy()
    s_phys = den(smp)
    cols = [("truth", xy, truth_all), ("sample mean", xt, s_phys.mean(0)), ("sample std", xt, s_phys.std(0)),
            ("one sample", xt, s_phys[0])]
    units = list(model_units().values())
    fig, axes = plt.subplots(4, 4, figsize=(15, 13))
    for j in range(4):
        lo, hi = truth_all[:, j].min(), truth_all[:, j].max()
        for k, (title, pts, val) in enumerate(cols):
            ax = axes[j, k]
            kw = {} if title == "sample std" else {"vmin": lo, "vmax": hi}
            lon, lat = region.from_model(pts)
            sc = ax.scatter(lon, lat, c=val[:, j], s=9, cmap="viridis", **kw)
            ax.scatter(*region.from_model(xc), s=1, c="k", alpha=0.3)
            ax.set_title(f"{NAMES[j]} {title} [{units[j]}]", fontsize=9)
            ax.set_aspect("equal")
            fig.colorbar(sc, ax=ax, shrink=0.8)
    fig.suptitle(f"{label}: {xc.shape[0]} context points (black dots), {xt.shape[0]} targets; "
                 f"{n_samples} samples, {solver.describe()}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
