"""Evaluation: CRPS against its closed form, the oracle outscoring a heuristic, and the CLI end to end
(pretrain -> evaluate --json with the oracle, a baseline and a plot)."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from typer.testing import CliRunner

from flownp.jobs.baselines.idw import IDWPredictor
from flownp.jobs.baselines.oracle import OraclePredictor
from flownp.jobs.cli import app
from flownp.core.solvers import SolverConfig
from flownp.jobs.evaluate import crps_from_samples, evaluate_predictor, synthetic_law
from ingest.store import Store
from ingest.tasks import TaskConfig, TaskSampler


def gaussian_crps(mu: float, sigma: float, y: np.ndarray) -> np.ndarray:
    z = (y - mu) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))


def test_crps_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    s = 2.0 * torch.randn(1, 20000, 1, 1, generator=g, dtype=torch.float64) + 1.0
    y = torch.tensor([-3.0, 0.0, 1.0, 4.5], dtype=torch.float64)
    got = torch.stack([crps_from_samples(s, yi.view(1, 1, 1)).squeeze() for yi in y]).numpy()
    np.testing.assert_allclose(got, gaussian_crps(1.0, 2.0, y.numpy()), rtol=0.02)


def test_crps_of_a_point_mass_is_the_absolute_error():
    s = torch.full((2, 8, 3, 4), 1.5)
    y = torch.zeros(2, 3, 4)
    torch.testing.assert_close(crps_from_samples(s, y), torch.full((2, 3, 4), 1.5))


def test_oracle_outscores_idw_and_is_calibrated(tiny_store):
    store = Store.open(tiny_store)
    _, test = store.load("test")
    batches = [TaskSampler(test, store.region.circle_xy, TaskConfig(80, 80, 60, 4, seed=s))[0] for s in range(2)]
    oracle = evaluate_predictor(OraclePredictor(synthetic_law(store), store.normalizer), batches,
                                store.normalizer, n_samples=64)
    idw = evaluate_predictor(IDWPredictor(), batches, store.normalizer, n_samples=64)
    assert oracle["tar_ll"] > idw["tar_ll"] + 1.0, (oracle["tar_ll"], idw["tar_ll"])
    assert all(oracle["rmse"][v] < idw["rmse"][v] for v in oracle["rmse"])
    # 64 draws from the true law: rank coverage is 0.9 in expectation (720 correlated points per variable);
    # the raw 5-95% quantile interval of S draws covers about (S-1)/(S+1) = 0.97 * 0.9 here
    assert all(0.84 < c < 0.96 for c in oracle["coverage90"].values()), oracle["coverage90"]
    assert all(0.40 < c < 0.60 for c in oracle["coverage50"].values()), oracle["coverage50"]
    assert "rank coverage" in oracle["coverage_kind"]
    assert oracle["predictor"]["ll_kind"] == "joint" and idw["predictor"]["ll_kind"].startswith("marginal")


@pytest.mark.slow
def test_cli_pretrain_then_evaluate_json(tiny_store, tmp_path):
    run = CliRunner()
    r = run.invoke(app, ["pretrain", "--data", str(tiny_store), "--out", str(tmp_path / "run"), "--steps", "4",
                         "--batch-size", "2", "--n-ctx", "40-60", "--n-tgt", "20", "--d-model", "16",
                         "--n-layers", "1", "--warmup", "1", "--ckpt-every", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["step"] == 4
    # a frozen set of 4 tasks with 60 targets each (the whole rest of the circle would make the oracle's
    # 4,800-dimensional posterior the cost of this test)
    from ingest.cli import app as ingest_app

    r = run.invoke(ingest_app, ["eval-set", str(tiny_store), "--out", str(tmp_path / "es"), "--split", "test",
                                "--n-tasks", "4", "--n-ctx", "40-50", "--n-tgt", "60", "--seed", "0"])
    assert r.exit_code == 0, r.output
    args = ["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(tiny_store),
            "--eval-set", str(tmp_path / "es"), "--batch-size", "2", "--samples", "4",
            "--ll-solver", "midpoint:4", "--baseline", "idw", "--plot", str(tmp_path / "task.png"), "--quiet"]
    r = run.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert {"flownp", "oracle", "idw", "gap_to_oracle", "eval_set"} <= set(res)
    assert res["flownp"]["n_tasks"] == 4 and math.isfinite(res["flownp"]["tar_ll"])
    assert res["eval_set"]["n_tgt"] == 60 and res["eval_set"]["seed"] == 0  # the numbers name their set
    assert res["gap_to_oracle"] == pytest.approx(res["oracle"]["tar_ll"] - res["flownp"]["tar_ll"])
    assert set(res["flownp"]["rmse"]) == {"sp", "t2m", "u10", "v10"}
    assert (tmp_path / "task.png").stat().st_size > 10_000
    # the same seed gives the same numbers
    again = json.loads(run.invoke(app, args + ["--json"]).output)
    assert again["flownp"]["tar_ll"] == res["flownp"]["tar_ll"]
    # bad input: a clear error, exit code 2
    r = run.invoke(app, args[:-1] + ["--baseline", "kriging"])
    assert r.exit_code == 2 and "unknown baseline" in r.output


def test_hutchinson_probes_are_drawn_per_batch_and_kept_for_the_same_tasks(tiny_store, monkeypatch):
    """Every batch used to get probe seed 0: their estimator errors were correlated and did not average out."""
    import flownp.jobs.evaluate as ev
    from flownp.core.config import ModelConfig
    from flownp.core.model import FlowNP
    from flownp.jobs.robustness import corrupted

    store = Store.open(tiny_store)
    _, test = store.load("test")
    sampler = TaskSampler(test, store.region.circle_xy, TaskConfig(30, 30, 10, 2, seed=5))
    batches = [sampler[0], sampler[1]]
    seeds: list[int] = []
    real = ev.log_likelihood
    monkeypatch.setattr(ev, "log_likelihood", lambda *a, seed, **kw: (seeds.append(seed), real(*a, seed=seed, **kw))[1])
    model = FlowNP(ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16, head_hidden=16))
    pred = ev.FlowNPPredictor(model, SolverConfig("euler", 2), seed=7)
    for b in batches + corrupted(batches, "gaussian:0.1", 0):
        pred.log_likelihood(b)
    assert seeds[0] != seeds[1]  # two batches, two probe draws
    assert seeds[2:] == seeds[:2]  # the same tasks with a corrupted context: the same probes (paired)
    assert ev.batch_probe_seed(8, batches[0]) != seeds[0]  # and the run's seed still matters


def test_gaussian_fit_score_is_the_closed_form_of_the_samples_mean_and_std():
    """Samples m +- s (two each per point) have mean m and unbiased std s * sqrt(4/3): the score is
    log N(y; m, that std^2) summed over variables, exactly."""
    from flownp.jobs.evaluate import gaussian_fit_log_score

    m = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64).expand(1, 3, 4)
    s = torch.tensor([1.0, 0.5, 2.0, 0.1], dtype=torch.float64)
    samples = torch.stack([m + s, m - s, m + s, m - s], dim=1)  # (1, 4, 3, 4)
    y = m + torch.tensor([[0.0], [1.0], [-2.0]], dtype=torch.float64)
    sd = s * math.sqrt(4 / 3)
    want = norm.logpdf(y.numpy(), m.numpy(), sd.numpy()).sum(-1)
    np.testing.assert_allclose(gaussian_fit_log_score(samples, y).numpy(), want, rtol=1e-12)


def test_gauss_ll_is_labelled_and_leaves_the_sample_metrics_unchanged(tiny_store):
    """The oracle's 50-sample Gaussian score sits below its exact joint tar_ll here (the targets are
    correlated, a product of marginals ignores that), is labelled as a marginal score, and drawing its 50
    samples does not change the 16-sample CRPS."""
    store = Store.open(tiny_store)
    _, test = store.load("test")
    batches = [TaskSampler(test, store.region.circle_xy, TaskConfig(80, 80, 40, 2, seed=s))[0] for s in range(2)]
    orc = OraclePredictor(synthetic_law(store), store.normalizer)
    plain = evaluate_predictor(orc, batches, store.normalizer, n_samples=16)
    both = evaluate_predictor(orc, batches, store.normalizer, n_samples=16, gauss_samples=50)
    assert "gauss_ll" not in plain and both["crps"] == plain["crps"]
    assert both["gauss_ll_samples"] == 50 and "not the model's joint density" in both["gauss_ll_units"]
    assert math.isfinite(both["gauss_ll"]) and both["gauss_ll"] < both["tar_ll"]
    same = evaluate_predictor(orc, batches, store.normalizer, n_samples=50, gauss_samples=50)
    assert same["gauss_ll"] != both["gauss_ll"]  # reuses the 50 sample-metric draws (one draw, not two)


def test_tar_ll_is_reported_per_solver_never_mixed(tiny_store, tmp_path):
    """evaluate_checkpoint: tar_ll is the primary solver's (as the oracle gap), every other solver has its
    own labelled entry, equal to a run with that solver as the primary."""
    from flownp.core.config import ModelConfig
    from flownp.jobs.evaluate import evaluate_checkpoint
    from flownp.jobs.train import TrainConfig, Trainer

    c = TrainConfig(steps=2, batch_size=2, n_ctx_min=30, n_ctx_max=30, n_tgt=10, warmup=1, ckpt_every=2, seed=0)
    Trainer(Store.open(tiny_store), tmp_path / "run", ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                                                   embed_hidden=16, head_hidden=16), c).run(progress=False)
    kw = dict(n_tasks=2, n_ctx=(30, 30), batch_size=2, n_samples=0, oracle=False, progress=False, exact=False)
    ck = str(tmp_path / "run" / "last.pt")
    res = evaluate_checkpoint(ck, str(tiny_store), ll_solver="midpoint:8", also_ll_solvers=("euler:4",), **kw)
    by = res["tar_ll_by_solver"]
    assert list(by) == ["midpoint:8", "euler:4"]
    assert by["midpoint:8"]["primary"] and not by["euler:4"]["primary"]
    assert by["midpoint:8"]["tar_ll"] == res["flownp"]["tar_ll"]
    assert by["euler:4"]["ll_solver"] == "euler, 4 steps" and by["euler:4"]["tar_ll"] != by["midpoint:8"]["tar_ll"]
    alone = evaluate_checkpoint(ck, str(tiny_store), ll_solver="euler:4", **kw)
    assert alone["flownp"]["tar_ll"] == pytest.approx(by["euler:4"]["tar_ll"], rel=1e-6)
    with pytest.raises(ValueError):
        evaluate_checkpoint(ck, str(tiny_store), also_ll_solvers=("leapfrog:3",), **kw)
    with pytest.raises(ValueError, match="gauss_samples"):
        evaluate_checkpoint(ck, str(tiny_store), gauss_samples=1, **kw)
