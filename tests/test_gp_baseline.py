"""The fitted-GP baseline: on GP weather it sits between the exact oracle and IDW, its density is a
proper joint Gaussian (it matches scipy's), and a singular context (repeated points) does not break it."""

import numpy as np
import torch
from scipy.stats import multivariate_normal

from flownp.baselines.gp import FittedGPPredictor, _cholesky
from flownp.baselines.idw import IDWPredictor
from flownp.baselines.oracle import OraclePredictor
from flownp.evaluate import evaluate_predictor, synthetic_law
from ingest.store import Store
from ingest.tasks import TaskBatch, TaskConfig, TaskSampler


def _batches(store):
    _, test = store.load("test")
    return [TaskSampler(test, store.region.circle_xy, TaskConfig(60, 60, 40, 2, seed=s))[0] for s in range(2)]


def test_fitted_gp_is_between_the_oracle_and_idw(tiny_store):
    store = Store.open(tiny_store)
    batches = _batches(store)
    norm = store.normalizer
    oracle = evaluate_predictor(OraclePredictor(synthetic_law(store), norm), batches, norm, n_samples=16)
    gp = evaluate_predictor(FittedGPPredictor(max_fit_points=60), batches, norm, n_samples=16)
    idw = evaluate_predictor(IDWPredictor(), batches, norm, n_samples=16)
    # the oracle knows the law (and the cross-variable coupling): nothing fitted may beat it by more than noise
    assert gp["tar_ll"] < oracle["tar_ll"] + 0.05, (gp["tar_ll"], oracle["tar_ll"])
    assert gp["tar_ll"] > idw["tar_ll"] + 0.5, (gp["tar_ll"], idw["tar_ll"])
    assert np.isfinite(gp["tar_ll"]) and gp["rmse"]["t2m"] < idw["rmse"]["t2m"]


def test_fitted_gp_density_is_the_joint_gaussian_it_predicts(tiny_store):
    store = Store.open(tiny_store)
    b = _batches(store)[0]
    gp = FittedGPPredictor(max_fit_points=60)
    ll = gp.log_likelihood(b)
    want = 0.0
    for j, (m, cov) in enumerate(gp._task(b, 0)):
        want += multivariate_normal(m, cov, allow_singular=False).logpdf(b.yt[0, :, j].double().numpy())
    np.testing.assert_allclose(ll[0].item(), want, rtol=1e-6)


def test_repeated_context_points_do_not_break_the_fit():
    g = torch.Generator().manual_seed(0)
    xc = torch.rand(1, 30, 2, generator=g) * 4
    xc = torch.cat([xc, xc[:, :10]], 1)  # 10 points given twice: the noiseless kernel matrix is singular
    yc = torch.sin(xc.sum(-1, keepdim=True)).repeat(1, 1, 4)
    xt = torch.rand(1, 12, 2, generator=g) * 4
    yt = torch.sin(xt.sum(-1, keepdim=True)).repeat(1, 1, 4)
    b = TaskBatch(xc, yc, xt, yt, torch.zeros(1, dtype=torch.long), torch.zeros(1, 40, dtype=torch.long),
                  torch.zeros(1, 12, dtype=torch.long))
    gp = FittedGPPredictor(max_fit_points=40)
    assert torch.isfinite(gp.log_likelihood(b)).all()
    assert torch.isfinite(gp.sample(b, 4, torch.Generator().manual_seed(1))).all()


def test_jittered_cholesky_factors_a_rank_deficient_matrix_and_refuses_an_indefinite_one():
    v = np.random.default_rng(0).normal(size=(6, 2))
    c, lower = _cholesky(v @ v.T)  # rank 2 of 6
    assert lower and np.isfinite(c).all()
    try:
        _cholesky(-np.eye(3))
    except np.linalg.LinAlgError:
        pass
    else:
        raise AssertionError("a negative definite matrix was factored")
