"""GAV residual: Hurwitz and contracting by construction, orthogonal Cayley factor, the SMW low-rank path,
the analytic divergence equal to the Jacobian's trace, equivariance, a near-zero start, and the wrapped
model going through the likelihood and sampling unchanged."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flownp.config import ModelConfig
from flownp.gav import (GAVConfig, GAVFlowNP, GAVResidual, cayley, contracting, hurwitz_schur,
                        lowrank_cayley_apply, skew)
from flownp.likelihood import _divergence, log_likelihood, log_likelihood_fn
from flownp.model import FlowNP
from flownp.sampling import sample
from flownp.solvers import SolverConfig

TINY = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16, head_hidden=32)
D = 4


def raw(seed: int, scale: float, shape=(D, D)) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 0.3, 3.0, 30.0]))
def test_schur_is_hurwitz_and_contracting_is_negative_definite(seed, scale):
    # eps well above the rounding error of eigenvalues of a very non-normal H (||T|| up to ~100)
    h = hurwitz_schur(raw(seed, scale), raw(seed + 1, scale), raw(seed + 2, scale, (D,)), eps=0.05)
    assert torch.linalg.eigvals(h).real.max() < 0
    c = contracting(raw(seed, scale), raw(seed + 2, scale, (D,)), raw(seed + 1, scale), eps=1e-4)
    assert torch.linalg.eigvalsh((c + c.T) / 2).max() < 0
    assert torch.linalg.eigvals(c).real.max() < 0  # contracting implies Hurwitz


def test_schur_need_not_contract():
    # a large off-diagonal T entry: Hurwitz (eigenvalues -1) but the symmetric part has a positive eigenvalue
    t_raw = torch.zeros(D, D, dtype=torch.float64)
    t_raw[0, 1] = 10.0
    a = torch.full((D,), 0.5413, dtype=torch.float64)  # softplus(a) ~ 1
    h = hurwitz_schur(torch.zeros(D, D, dtype=torch.float64), t_raw, a, eps=1e-4)
    assert torch.linalg.eigvals(h).real.max() < 0
    assert torch.linalg.eigvalsh((h + h.T) / 2).max() > 0


def test_cayley_is_orthogonal_and_lowrank_path_matches_dense():
    u = cayley(skew(raw(0, 2.0, (3, D, D))))
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, eye.expand(3, D, D))
    torch.testing.assert_close(torch.linalg.det(u), torch.ones(3, dtype=torch.float64))
    d, r = 64, 3
    p, q, x = raw(1, 0.5, (d, r)), raw(2, 0.5, (d, r)), raw(3, 1.0, (d, 5))
    dense = cayley(p @ q.T - q @ p.T) @ x
    torch.testing.assert_close(lowrank_cayley_apply(p, q, x), dense)


@pytest.mark.parametrize("kind", ["contracting", "schur"])
def test_residual_trajectories_approach_each_other(kind):
    torch.manual_seed(0)
    s_raw, k_raw = torch.randn(D, D, dtype=torch.float64), 3 * torch.randn(D, D, dtype=torch.float64)
    rates = torch.zeros(D, dtype=torch.float64)  # softplus(0): damping rates ln 2
    h = contracting(s_raw, rates, k_raw, 1e-3) if kind == "contracting" else hurwitz_schur(s_raw, k_raw, rates, 1e-3)
    m = torch.randn(D, dtype=torch.float64)
    ya, yb, dt = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64) + 3, 1e-3
    dist = [float((ya - yb).norm())]
    for _ in range(20_000):  # explicit Euler of dy/dt = H (y - m), t in [0, 20]
        ya, yb = ya + dt * h @ (ya - m), yb + dt * h @ (yb - m)
        dist.append(float((ya - yb).norm()))
    assert dist[-1] < 0.1 * dist[0]
    if kind == "contracting":  # contracting: the distance never grows, at any instant
        assert all(b <= a * (1 + 1e-12) for a, b in zip(dist, dist[1:]))


def _residual(kind: str) -> GAVResidual:
    torch.manual_seed(1)
    r = GAVResidual(GAVConfig(kind=kind, hidden=8), d_model=6).double()
    for p in r.parameters():  # move away from the near-zero initialisation
        torch.nn.init.normal_(p, std=0.5)
    return r


@pytest.mark.parametrize("kind", ["schur", "contracting", "mlp"])
def test_divergence_equals_the_jacobian_trace(kind):
    r = _residual(kind)
    b, n = 2, 5
    summary, xt, yt = torch.randn(b, 6, dtype=torch.float64), torch.randn(b, n, 2, dtype=torch.float64), \
        torch.randn(b, n, D, dtype=torch.float64)
    t = torch.full((b, n), 0.3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda y: r(summary, xt, y, t), yt)  # (b, n, D, b, n, D)
    trace = torch.stack([jac[i].reshape(n * D, b, n * D)[:, i].diagonal().sum() for i in range(b)])
    if kind == "mlp":  # no analytic divergence: the likelihood's per-point autograd trace is exact for it
        with pytest.raises(ValueError, match="no analytic divergence"):
            r.divergence(summary, t)
        y = yt.clone().requires_grad_(True)
        torch.testing.assert_close(_divergence(r(summary, xt, y, t), y, "exact-blocks", None, False)[:, 0], trace)
    else:
        torch.testing.assert_close(r.divergence(summary, t), trace)


def _gav(kind: str, seed: int = 0) -> GAVFlowNP:
    torch.manual_seed(seed)
    m = GAVFlowNP(FlowNP(TINY), GAVConfig(kind=kind, hidden=8)).double().eval()
    return m


def _task(b=2, nc=7, nt=5):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(b, nc, 2), r(b, nc, D), r(b, nt, 2), r(b, nt, D)


@pytest.mark.parametrize("kind", ["schur", "contracting", "mlp"])
def test_equivariance_and_small_start(kind):
    m = _gav(kind)
    xc, yc, xt, yt = _task()
    v = m(xc, yc, xt, yt, 0.4)
    pt, pc = torch.randperm(xt.shape[1]), torch.randperm(xc.shape[1])
    torch.testing.assert_close(m(xc[:, pc], yc[:, pc], xt[:, pt], yt[:, pt], 0.4), v[:, pt])
    ctx = m.encode_context(xc, yc)
    res = m.residual_velocity(ctx, xt, yt, 0.4)
    assert res.norm() < 1e-2 * m.base.velocity(ctx.base, xt, yt, 0.4).norm()
    assert not any(p.requires_grad for p in m.base.parameters())  # frozen base by default


@pytest.mark.parametrize("kind", ["schur", "mlp"])
def test_likelihood_and_sampling_run_through_the_wrapper(kind):
    m = _gav(kind)
    for p in m.residual.parameters():
        torch.nn.init.normal_(p, std=0.3)
    xc, yc, xt, yt = _task()
    solver = SolverConfig("rk4", 8)
    got = log_likelihood(m, xc, yc, xt, yt, solver=solver, estimator="exact")
    ctx = m.encode_context(xc, yc)
    # reference: the whole field through the generic exact estimator (autograd over base + residual)
    ref = log_likelihood_fn(lambda t, y: m.velocity(ctx, xt, y, t), yt, solver=solver, estimator="exact-full")
    torch.testing.assert_close(got.joint, ref.joint)
    base = log_likelihood(m.base, xc, yc, xt, yt, solver=solver, estimator="exact")
    assert not torch.allclose(got.joint, base.joint)  # the residual changed the density
    s = sample(m, xc, yc, xt, n_samples=3, solver=SolverConfig("euler", 4), generator=torch.Generator().manual_seed(0))
    assert s.samples.shape == (2, 3, 5, D) and torch.isfinite(s.samples).all()


def test_hutchinson_with_analytic_residual_trace_is_unbiased():
    m = _gav("contracting")
    for p in m.residual.parameters():
        torch.nn.init.normal_(p, std=0.3)
    xc, yc, xt, yt = _task(b=1)
    solver = SolverConfig("midpoint", 8)
    exact = log_likelihood(m, xc, yc, xt, yt, solver=solver, estimator="exact").joint
    est = log_likelihood(m, xc, yc, xt, yt, solver=solver, estimator="hutchinson", n_probes=400).joint
    assert abs(float(est - exact)) < 0.5, (float(est), float(exact))


def test_bad_gav_settings_are_refused():
    with pytest.raises(ValueError, match="kind"):
        GAVConfig(kind="viscous")
    with pytest.raises(ValueError, match="eps"):
        GAVConfig(eps=0.0)
    assert GAVConfig.from_dict(GAVConfig(kind="mlp").to_dict()) == GAVConfig(kind="mlp")
