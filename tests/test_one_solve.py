"""Samples and their log-likelihoods from one solve (flownp.core.likelihood.sample_log_likelihood): the
samples are those `sample` draws from the same noise, the scores converge to the backward-solve scores as
the steps grow, and the service path takes it only where it applies (samples never depend on it)."""

import numpy as np
import pytest
import torch

from flownp.core.config import ModelConfig
from flownp.core.likelihood import is_one_flow, sample_log_likelihood, samples_log_likelihood
from flownp.core.model import FlowNP
from flownp.core.sampling import draw_noise, sample
from flownp.core.solvers import SolverConfig
from flownp.inference import build_model, extrapolate, one_solve, parse_solver, task
from tests.tiny_samplers import tiny_checkpoint, tiny_module

TINY = dict(d_model=16, n_heads=2, n_layers=2, d_ff=32, embed_hidden=16, head_hidden=32, activation="silu")


def flow(**kw) -> FlowNP:
    torch.manual_seed(0)
    m = FlowNP(ModelConfig(arch="pointwise", targets="independent", value_layers=1, **TINY, **kw)).double().eval()
    with torch.no_grad():  # a residual head starts at zero: a flow that moves
        m.head[-1].weight.normal_(0, 0.3)
    return m


def data(b=2, nc=9, nt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nc, 2, generator=g, dtype=torch.float64) * 3, torch.randn(b, nc, 4, generator=g,
            dtype=torch.float64), torch.randn(b, nt, 2, generator=g, dtype=torch.float64) * 3)


@pytest.mark.parametrize("base", ["standard", "gp"])
def test_one_solve_draws_the_samples_of_sample_and_scores_them_as_the_backward_solve(base):
    kw = {} if base == "standard" else dict(base="gp", standardise="context", velocity="residual")
    m = flow(**kw)
    xc, yc, xt = data()
    y0 = draw_noise(m, xt, 3, torch.Generator().manual_seed(4))
    solver = SolverConfig("midpoint", 6)
    smp, res = sample_log_likelihood(m, xc, yc, xt, y0, solver=solver)
    torch.testing.assert_close(smp, sample(m, xc, yc, xt, n_samples=3, solver=solver, y0=y0).samples,
                               rtol=1e-9, atol=1e-9)
    assert res.joint.shape == (6,) and res.nfe == solver.nfe() and "sampling solve" in res.solver
    # both integrate the same log-density, forwards from the noise and backwards from the sample: at many
    # steps they agree, at few they differ by about the solver's error
    fine = SolverConfig("midpoint", 200)
    smp_f, res_f = sample_log_likelihood(m, xc, yc, xt, y0, solver=fine)
    back = samples_log_likelihood(m, xc, yc, xt, smp_f, solver=fine)
    torch.testing.assert_close(res_f.joint, back.joint, rtol=0, atol=2e-4 * 6 * 4)
    coarse_err = (res.joint - samples_log_likelihood(m, xc, yc, xt, smp, solver=fine).joint).abs().max()
    fine_err = (res_f.joint - back.joint).abs().max()
    assert fine_err < coarse_err  # it converges: the coarse solve's score is off by its solver's error


def test_one_solve_is_refused_for_models_with_their_own_flows():
    lfm = tiny_module("lfm")
    assert not is_one_flow(lfm) and is_one_flow(tiny_module("flownp"))
    xc, yc, xt = (z.float() for z in data())
    with pytest.raises(ValueError, match="single FlowNP"):
        sample_log_likelihood(lfm, xc, yc, xt, torch.zeros(2, 1, 6, 4), solver=SolverConfig("euler", 2))


def _request(lm):
    r = lm.space.region
    lat, lon = r.circle_lat, r.circle_lon
    vals = np.tile(np.array([100000.0, 290.0, 1.0, -1.0], dtype=np.float32), (len(lat), 1))
    vals += np.random.default_rng(0).normal(0, [200, 1, 0.5, 0.5], vals.shape).astype(np.float32)
    return task(lm.space, lat[:40], lon[:40], vals[:40], lat[40:52], lon[40:52])


def _pointwise_checkpoint():
    """tiny_checkpoint('flownp') with a pointwise GP-base FlowNP (the served default's kind: the tangent path)."""
    m = flow(base="gp", standardise="context", velocity="residual").float()
    return {**tiny_checkpoint("flownp"), "model_config": m.config.to_dict(), "model": m.state_dict()}


@pytest.mark.parametrize("kind", ["cached", "pointwise"])
def test_the_service_path_takes_one_solve_only_with_one_solver_and_samples_do_not_depend_on_it(kind):
    lm = build_model("t", tiny_checkpoint("flownp") if kind == "cached" else _pointwise_checkpoint(), None, "test")
    assert lm.model.has_jacobian_blocks is (kind == "pointwise")
    t = _request(lm)
    mid = parse_solver("midpoint:3")
    assert one_solve(lm.plan(None), mid, mid) and not one_solve(lm.plan(None), parse_solver("euler:6"), mid)
    kw = dict(num_samples=3, seed=2, estimator="auto")
    joint = extrapolate(lm, t, solver=mid, with_ll=True, ll_solver=mid, **kw)
    apart = extrapolate(lm, t, solver=mid, with_ll=True, ll_solver=parse_solver("midpoint:4"), **kw)
    alone = extrapolate(lm, t, solver=mid, with_ll=False, ll_solver=mid, **kw)
    # the same samples to float rounding (ERA5 units: Pa for sp); the tangent pass's forward is not the fused kernel
    np.testing.assert_allclose(joint["samples"], alone["samples"], rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(apart["samples"], alone["samples"], rtol=0, atol=0)
    assert "sampling solve" in joint["ll"]["solver"] and "sampling solve" not in apart["ll"]["solver"]
    assert joint["nfe"] == joint["ll"]["nfe"] == mid.nfe()
    # forwards in the sampling solve and backwards from the samples: the same log-density, to the solvers' error
    fine = parse_solver("midpoint:40")
    one = extrapolate(lm, t, solver=fine, with_ll=True, ll_solver=fine, **kw)
    back = extrapolate(lm, t, solver=fine, with_ll=True, ll_solver=parse_solver("midpoint:41"), **kw)
    assert one["ll"]["in_sampling_solve"] and not back["ll"]["in_sampling_solve"]
    np.testing.assert_allclose(one["ll"]["joint_normalised"], back["ll"]["joint_normalised"], rtol=0, atol=1e-3 * 48)
    assert np.abs(joint["ll"]["joint_normalised"] - apart["ll"]["joint_normalised"]).max() < 0.1 * 48
    lfm = build_model("t", tiny_checkpoint("lfm"), None, "test")
    assert not one_solve(lfm.plan(None), mid, mid)
    with pytest.raises(ValueError, match="fixed-step"):
        sample_log_likelihood(lm.model, t.xc, t.yc, t.xt, torch.zeros(1, 1, 12, 4), solver=parse_solver("dopri5:1e-4"))
