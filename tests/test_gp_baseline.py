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


def test_standardisation_makes_the_gp_scale_equivariant_with_the_jacobian_in_its_density(tiny_store):
    """normalize_y: the context of each variable is standardised by its own mean and std before fitting, so
    scaling one variable by s (a power of two: exact in floating point, so the fits are bit-identical)
    scales its predictive mean and samples by s and changes the log-likelihood by exactly -n_tgt * log(s);
    a shift moves the mean and samples and leaves the density unchanged."""
    import dataclasses
    import math

    import torch

    store = Store.open(tiny_store)
    b = _batches(store)[0]
    gp = FittedGPPredictor(max_fit_points=60)
    ll = gp.log_likelihood(b)
    smp = gp.sample(b, 8, torch.Generator().manual_seed(0))
    n_tgt = b.yt.shape[1]
    for j, s in ((1, 4.0), (3, 0.125)):
        scaled = dataclasses.replace(b, yc=b.yc.clone(), yt=b.yt.clone())
        scaled.yc[..., j] *= s
        scaled.yt[..., j] *= s
        ll_s = gp.log_likelihood(scaled)
        np.testing.assert_allclose((ll_s - ll).numpy(), -n_tgt * math.log(s), rtol=1e-9, atol=1e-8)
        smp_s = gp.sample(scaled, 8, torch.Generator().manual_seed(0))
        np.testing.assert_allclose(smp_s[..., j].numpy(), s * smp[..., j].numpy(), rtol=1e-5, atol=1e-6)
        others = [k for k in range(4) if k != j]
        np.testing.assert_array_equal(smp_s[..., others].numpy(), smp[..., others].numpy())
        m_s, m = gp._task(scaled, 0)[j][0], gp._task(b, 0)[j][0]
        np.testing.assert_allclose(m_s, s * m, rtol=1e-9)
    # (a shift is not exact in float32: the values, so the fits, move by rounding)
    shifted = dataclasses.replace(b, yc=b.yc.clone() + 8.0, yt=b.yt.clone() + 8.0)
    np.testing.assert_allclose(gp.log_likelihood(shifted).numpy(), ll.numpy(), rtol=1e-4)
    # without the standardisation the fitted GP is not scale-equivariant (its bounds and noise floor are absolute)
    raw = FittedGPPredictor(max_fit_points=60, standardize=False)
    assert gp.describe()["standardize"] != raw.describe()["standardize"] == "none"


def test_marginal_likelihood_gradient_is_exact():
    from scipy.optimize import check_grad

    from flownp.jobs.baselines.gp import _nlml, _nlml_and_grad

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2)) * 3
    y = np.sin(x[:, 0]) + 0.1 * rng.normal(size=40)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    th = np.log([1.3, 0.7, 0.05])
    f = lambda t: _nlml_and_grad(t, d2, y)[0]  # noqa: E731
    g = lambda t: _nlml_and_grad(t, d2, y)[1]  # noqa: E731
    assert check_grad(f, g, th) < 1e-4 * np.abs(g(th)).max()
    assert f(th) == _nlml(th, x, y)
