"""FlowNP model: equivariance, target independence, exact traces, sampling."""

import pytest
import torch

from flownp.core.config import ModelConfig
from flownp.core.likelihood import log_likelihood, log_likelihood_fn
from flownp.core.model import FlowNP, count_parameters
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig

TINY = dict(d_model=16, n_heads=2, n_layers=2, d_ff=32, embed_hidden=16, head_hidden=32)
CONFIGS = {
    "reference": ModelConfig(arch="reference", encoding="reference", **TINY),
    "cached-joint": ModelConfig(targets="joint", **TINY),
    "cached-independent": ModelConfig(targets="independent", **TINY),
    "pointwise": ModelConfig(arch="pointwise", targets="independent", head_layers=3, **TINY),
    "pointwise-nb": ModelConfig(arch="pointwise", targets="independent", head_neighbours=3, **TINY),
    "pointwise-v1": ModelConfig(arch="pointwise", targets="independent", value_layers=1, **TINY),
}


def data(b=2, nc=7, nt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nc, 2, generator=g) * 5, torch.randn(b, nc, 4, generator=g),
            torch.randn(b, nt, 2, generator=g) * 5, torch.randn(b, nt, 4, generator=g))


def test_reference_size_matches_the_paper():
    assert count_parameters(FlowNP(ModelConfig.reference())) == 237_828  # "about 238K"


def test_config_round_trip_and_validation():
    c = CONFIGS["cached-independent"]
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="independent"):
        ModelConfig(arch="reference", targets="independent")
    with pytest.raises(ValueError, match="unknown model config"):
        ModelConfig.from_dict({**c.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="pointwise.*independent"):
        ModelConfig(arch="pointwise", targets="joint")
    with pytest.raises(ValueError, match="head_layers"):
        ModelConfig(head_layers=1)
    with pytest.raises(ValueError, match="head_neighbours"):
        ModelConfig(head_neighbours=4)  # only with arch='pointwise'
    with pytest.raises(ValueError, match="value_layers"):
        ModelConfig(arch="pointwise", targets="independent", n_layers=2, value_layers=3)



@pytest.mark.parametrize("name", list(CONFIGS))
def test_permutation_equivariance(name):
    torch.manual_seed(0)
    m = FlowNP(CONFIGS[name]).eval()
    xc, yc, xt, yt = data()
    t = torch.rand(2, 5)
    v = m(xc, yc, xt, yt, t)
    pt, pc = torch.randperm(5), torch.randperm(7)
    torch.testing.assert_close(m(xc, yc, xt[:, pt], yt[:, pt], t[:, pt]), v[:, pt], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(xc[:, pc], yc[:, pc], xt, yt, t), v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,independent", [("cached-independent", True), ("pointwise", True),
                                              ("pointwise-nb", True), ("pointwise-v1", True),
                                              ("cached-joint", False), ("reference", False)])
def test_independent_targets_do_not_see_each_other(name, independent):
    torch.manual_seed(1)
    m = FlowNP(CONFIGS[name]).eval()
    xc, yc, xt, yt = data()
    v = m(xc, yc, xt, yt, 0.3)
    yt2 = yt.clone()
    yt2[:, 0] += 1.0
    moved = (m(xc, yc, xt, yt2, 0.3) - v)[:, 1:].abs().max().item()
    assert (moved < 1e-6) if independent else (moved > 1e-4)


@pytest.mark.parametrize("name", ["cached-independent", "pointwise", "pointwise-nb", "pointwise-v1"])
def test_exact_block_trace_equals_full_jacobian_trace_for_independent_targets(name):
    torch.manual_seed(2)
    m = FlowNP(CONFIGS[name]).double().eval()
    xc, yc, xt, yt = (a.double() for a in data())
    cfg = SolverConfig("rk4", 4)
    blocks = log_likelihood(m, xc, yc, xt, yt, solver=cfg, estimator="auto")
    full = log_likelihood(m, xc, yc, xt, yt, solver=cfg, estimator="exact-full")
    assert blocks.estimator == "exact-blocks"
    torch.testing.assert_close(blocks.joint, full.joint, atol=1e-9, rtol=0)
    # for a joint model the block sum misses the cross-point terms: it differs from the full trace ...
    mj = FlowNP(CONFIGS["cached-joint"]).double().eval()
    fj = log_likelihood(mj, xc, yc, xt, yt, solver=cfg, estimator="exact-full")
    ctx = mj.encode_context(xc, yc)
    bj = log_likelihood_fn(lambda t, y: mj.velocity(ctx, xt, y, t), yt, solver=cfg, estimator="exact-blocks")
    assert (fj.joint - bj.joint).abs().max() > 1e-6
    # ... so a joint model refuses it (it used to return that wrong number silently)
    with pytest.raises(ValueError, match="exact-blocks.*independent"):
        log_likelihood(mj, xc, yc, xt, yt, solver=cfg, estimator="exact-blocks")


def test_likelihood_is_invariant_to_target_order():
    torch.manual_seed(3)
    m = FlowNP(CONFIGS["cached-joint"]).double().eval()
    xc, yc, xt, yt = (a.double() for a in data())
    p = torch.randperm(5)
    cfg = SolverConfig("rk4", 4)
    a = log_likelihood(m, xc, yc, xt, yt, solver=cfg, estimator="exact-full").joint
    b = log_likelihood(m, xc, yc, xt[:, p], yt[:, p], solver=cfg, estimator="exact-full").joint
    torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_sampling_shapes_seeds_and_ode_inverse():
    torch.manual_seed(4)
    m = FlowNP(CONFIGS["cached-joint"]).double().eval()
    xc, yc, xt, _ = (a.double() for a in data())
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    s1 = sample(m, xc, yc, xt, n_samples=3, solver=SolverConfig("rk4", 8), generator=g())
    s2 = sample(m, xc, yc, xt, n_samples=3, solver=SolverConfig("rk4", 8), generator=g())
    assert s1.samples.shape == (2, 3, 5, 4) and s1.nfe == 32
    assert torch.equal(s1.samples, s2.samples)
    assert not torch.allclose(s1.samples[:, 0], s1.samples[:, 1])
    # sampling and likelihood are the same ODE: running the sample back lands on its noise
    y0 = torch.randn(2, 1, 5, 4, generator=g(), dtype=torch.float64)
    fwd = sample(m, xc, yc, xt, y0=y0, solver=SolverConfig("rk4", 64)).samples[:, 0]
    from flownp.core.solvers import solve
    ctx = m.encode_context(xc, yc)
    back = solve(lambda t, s: (m.velocity(ctx, xt, s[0], t),), (fwd,), 1.0, 0.0, SolverConfig("rk4", 64))
    torch.testing.assert_close(back.state[0], y0[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["cached-joint", "cached-independent", "pointwise", "pointwise-nb",
                                  "pointwise-v1", "reference"])
def test_likelihood_is_differentiable_twice_for_training(name):
    """create_graph=True differentiates the divergence (needs attention with a second derivative)."""
    torch.manual_seed(5)
    m = FlowNP(CONFIGS[name]).double()
    xc, yc, xt, yt = (a.double() for a in data(b=1, nc=4, nt=3))
    res = log_likelihood(m, xc, yc, xt, yt, solver=SolverConfig("euler", 2), estimator="hutchinson",
                         create_graph=True)
    res.joint.sum().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", ["pointwise", "pointwise-v1"])
def test_pointwise_transformer_runs_once_per_solve_and_task(name):
    """arch='pointwise': the targets' transformer pass depends on their locations only, so a whole solve
    (every step, every sample) runs it once per task; the velocity is the same as a fresh evaluation."""
    torch.manual_seed(6)
    m = FlowNP(CONFIGS[name]).double().eval()
    xc, yc, xt, yt = (a.double() for a in data())
    calls = _count_calls(m.embed_target)
    s = sample(m, xc, yc, xt, n_samples=3, solver=SolverConfig("euler", 8), generator=torch.Generator().manual_seed(0))
    assert s.nfe == 8 and calls[0] == 1
    ctx = m.encode_context(xc, yc)
    v = m.velocity(ctx, xt, yt, 0.4)
    torch.testing.assert_close(m.velocity(ctx, xt, yt + 1.0, 0.7),
                               m.velocity(m.encode_context(xc, yc), xt.clone(), yt + 1.0, 0.7))
    assert calls[0] == 3  # a new context and a new xt tensor each recompute it
    assert not torch.allclose(v, m.velocity(ctx, xt, yt + 1.0, 0.4))  # the value does reach the head


@pytest.mark.parametrize("name", ["cached-independent", "pointwise", "pointwise-nb", "pointwise-v1",
                                  "cached-joint"])
def test_samples_log_likelihood_equals_scoring_each_copy(name):
    """samples_log_likelihood shares the context's (and the pointwise targets') work among a task's S
    samples; it gives what log_likelihood gives on S copies of the task."""
    from flownp.core.likelihood import samples_log_likelihood
    torch.manual_seed(7)
    m = FlowNP(CONFIGS[name]).double().eval()
    xc, yc, xt, _ = (a.double() for a in data())
    ys = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    cfg = SolverConfig("euler", 3)
    est = "exact" if name == "cached-joint" else "auto"
    shared = samples_log_likelihood(m, xc, yc, xt, ys, solver=cfg, estimator=est)
    rep = lambda z: z.repeat_interleave(3, dim=0)  # noqa: E731
    each = log_likelihood(m, rep(xc), rep(yc), rep(xt), ys.reshape(6, 5, 4), solver=cfg, estimator=est)
    torch.testing.assert_close(shared.joint, each.joint, atol=1e-9, rtol=0)
    assert shared.estimator == each.estimator


def test_pointwise_head_neighbours_are_the_nearest_context_points():
    """head_neighbours = k: besides the transformer's summary, a target's head reads the final states of
    its k nearest context points only: changing a far point's state changes nothing, a near one's does."""
    import dataclasses
    torch.manual_seed(8)
    m = FlowNP(CONFIGS["pointwise-nb"]).double().eval()
    xc, yc, xt, yt = (a.double() for a in data(b=1, nc=7, nt=1))
    dist = ((xc[0] - xt[0, 0]) ** 2).sum(-1)
    ctx = m.encode_context(xc, yc)
    assert m._target_features(ctx, xt).keys.shape == (1, 1, 2, 3, 8)  # (B, n, heads, k, d_head)
    v = m.velocity(ctx, xt, yt, 0.5)

    def moved(point: int) -> float:
        out = ctx.out.clone()
        out[0, point] += 3.0
        c2 = dataclasses.replace(ctx, out=out, features=[])
        c2.kv = ctx.kv  # the transformer's summary h is the same (it reads kv, not out)
        return float((m.velocity(c2, xt, yt, 0.5) - v).detach().abs().max())

    assert moved(int(dist.argmax())) < 1e-12
    assert moved(int(dist.argmin())) > 1e-6
