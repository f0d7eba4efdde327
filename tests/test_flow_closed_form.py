"""Solvers and log-likelihoods against fields whose flow and density are known in closed form."""

import math

import pytest
import torch

from flownp.core.likelihood import log_likelihood_fn
from flownp.core.solvers import SolverConfig, solve



@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def gaussian_field(mu, s):
    """The marginal linear-path velocity carrying N(0, I) (t=0) to N(mu, diag s^2) (t=1):
    p_t = N(t mu, (1-t)^2 + t^2 s^2), v = mu + sigma_t'/sigma_t (y - t mu)."""
    def v(t, y):
        sig2 = (1 - t) ** 2 + t**2 * s**2
        return mu + (t * s**2 - (1 - t)) / sig2 * (y - t * mu)
    return v


def gaussian_logpdf(y, mu, s):
    return (-0.5 * ((y - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


@pytest.fixture()
def problem():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=g)
    s = 0.3 + torch.rand(3, 4, generator=g)
    y1 = mu + s * torch.randn(2, 3, 4, generator=g)
    return mu, s, y1


SOLVERS = [
    (SolverConfig("euler", 400), 2e-2), (SolverConfig("midpoint", 100), 2e-3), (SolverConfig("rk4", 40), 1e-5),
    (SolverConfig("dopri5", rtol=1e-8, atol=1e-8), 1e-5), (SolverConfig("rk4", 40, adjoint=True), 1e-5),
]


@pytest.mark.parametrize("cfg,tol", SOLVERS, ids=lambda c: getattr(c, "method", ""))
@pytest.mark.parametrize("estimator", ["exact-blocks", "exact-full", "hutchinson"])
def test_every_solver_and_estimator_gives_the_gaussian_density(problem, cfg, tol, estimator):
    mu, s, y1 = problem
    res = log_likelihood_fn(gaussian_field(mu, s), y1, solver=cfg, estimator=estimator, n_probes=2)
    exact = gaussian_logpdf(y1, mu, s)
    # a diagonal Jacobian makes Rademacher-Hutchinson exact too
    torch.testing.assert_close(res.joint, exact, atol=tol * 12, rtol=0)
    assert res.nfe > 0 and res.n_targets == 3
    torch.testing.assert_close(res.per_point, res.joint / 3)


@pytest.mark.parametrize("cfg,tol", SOLVERS[:4], ids=lambda c: getattr(c, "method", ""))
def test_sampling_ode_carries_noise_to_the_gaussian(problem, cfg, tol):
    mu, s, _ = problem
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    out = solve(lambda t, st: (gaussian_field(mu, s)(t, st[0]),), (z,), 0.0, 1.0, cfg)
    # the flow of this field maps z to mu + s z exactly
    torch.testing.assert_close(out.state[0], mu + s * z, atol=tol * 5, rtol=0)


def test_hutchinson_is_unbiased_on_a_coupled_linear_field():
    """v = A y with a dense A couples all points: log p1(y1) = log N(expm(-A) y1) - tr(A)."""
    g = torch.Generator().manual_seed(2)
    n, d = 3, 4
    a = 0.3 * torch.randn(n * d, n * d, generator=g)
    y1 = torch.randn(2, n, d, generator=g)
    vf = lambda t, y: (y.flatten(1) @ a.T).view_as(y)  # noqa: E731
    y0 = (y1.flatten(1) @ torch.linalg.matrix_exp(-a).T)
    exact = -0.5 * y0.pow(2).sum(1) - 0.5 * n * d * math.log(2 * math.pi) - torch.trace(a)
    cfg = SolverConfig("rk4", 30)
    full = log_likelihood_fn(vf, y1, solver=cfg, estimator="exact-full")
    torch.testing.assert_close(full.joint, exact, atol=1e-6, rtol=0)
    hut = log_likelihood_fn(vf, y1, solver=cfg, estimator="hutchinson", n_probes=400, probe="gaussian", seed=3)
    err = (hut.joint - exact).abs()
    assert torch.all(err < 4 * hut.spread / math.sqrt(400)), (err, hut.spread)
    assert torch.all(hut.spread > 0.05)  # the probes really disagree on a coupled field
    # the block estimator is only exact without coupling between points: here it must be wrong
    blocks = log_likelihood_fn(vf, y1, solver=cfg, estimator="exact-blocks")
    assert (blocks.joint - exact).abs().max() > 1e-3


def test_hutchinson_is_seeded():
    vf = lambda t, y: y.roll(1, dims=1) * 0.5  # noqa: E731
    y1 = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0))
    run = lambda seed: log_likelihood_fn(vf, y1, solver=SolverConfig("rk4", 4), n_probes=3, seed=seed).joint  # noqa: E731
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_gradcheck_through_the_likelihood():
    y1 = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(4))

    def f(mu, log_s):
        return log_likelihood_fn(gaussian_field(mu, log_s.exp()), y1, solver=SolverConfig("rk4", 3),
                                 estimator="exact-blocks", create_graph=True).joint

    mu = torch.randn(2, 4, requires_grad=True)
    log_s = (0.2 * torch.randn(2, 4)).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (mu, log_s), eps=1e-6, atol=1e-5)


def test_bad_solver_settings_are_refused():
    with pytest.raises(ValueError, match="unknown solver"):
        SolverConfig("heun3")
    with pytest.raises(ValueError, match="steps"):
        SolverConfig("euler", 0)
    with pytest.raises(ValueError, match="estimator"):
        log_likelihood_fn(lambda t, y: y, torch.zeros(1, 1, 4), estimator="trace")
