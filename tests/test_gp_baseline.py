"""The fitted-GP baseline: on GP weather it sits between the exact oracle and IDW, its density is a
proper joint Gaussian (it matches scipy's), and its Cholesky survives a singular matrix with a small jitter."""

import numpy as np
from scipy import linalg as sla
from scipy.stats import multivariate_normal

from flownp.jobs.baselines.gp import FittedGPPredictor, _cholesky
from flownp.jobs.baselines.idw import IDWPredictor
from flownp.jobs.baselines.oracle import OraclePredictor
from flownp.jobs.evaluate import evaluate_predictor, synthetic_law
from ingest.store import Store
from ingest.tasks import TaskConfig, TaskSampler


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


def test_jittered_cholesky_factors_a_rank_deficient_matrix_and_refuses_an_indefinite_one():
    v = np.random.default_rng(0).normal(size=(6, 2))
    a = v @ v.T  # rank 2 of 6: a plain Cholesky fails on it, so this takes the jitter path
    try:
        sla.cho_factor(a, lower=True)
        plain = True
    except np.linalg.LinAlgError:
        plain = False
    assert not plain
    c, lower = _cholesky(a)
    l = np.tril(c)
    assert lower and np.isfinite(c).all()
    np.testing.assert_allclose(l @ l.T, a, atol=1e-6 * np.abs(a).max())  # the jitter is small
    try:
        _cholesky(-np.eye(3))
    except np.linalg.LinAlgError:
        pass
    else:
        raise AssertionError("a negative definite matrix was factored")
