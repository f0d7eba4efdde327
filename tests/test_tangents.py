"""Forward tangents of the pointwise value path (flownp.core.tangents, FlowNP.velocity_jacobian) against
autograd, and the likelihood solve that uses them: the same numbers as the reverse-mode trace, and the
midpoint method's first stage spared the divergence without changing the result."""

import pytest
import torch
import torch.nn.functional as F

from flownp.core import tangents
from flownp.core.config import ModelConfig
from flownp.core.likelihood import Velocity, flow_field, log_likelihood, log_likelihood_fn
from flownp.core.model import FlowNP
from flownp.core.sampling import CheckedFlow, expand_samples
from flownp.core.solvers import AugmentedField, SolverConfig, solve

TINY = dict(d_model=16, n_heads=2, n_layers=2, d_ff=32, embed_hidden=16, head_hidden=32)


def model(value_layers: int, activation: str = "silu", seed: int = 0, **kw) -> FlowNP:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="pointwise", targets="independent", value_layers=value_layers, activation=activation,
                      **TINY, **kw)
    m = FlowNP(cfg).double().eval()
    with torch.no_grad():  # a residual head starts at zero: give it weights so that the Jacobian is not trivial
        m.head[-1].weight.normal_(0, 0.3)
        m.head[-1].bias.normal_(0, 0.3)
    return m


def data(b=2, nc=7, nt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64) * sc
                 for s, sc in (((b, nc, 2), 3.0), ((b, nc, 4), 1.0), ((b, nt, 2), 3.0), ((b, nt, 4), 1.0)))


def autograd_blocks(m, ctx, xt, y, t):
    """(B, n, 4, 4) blocks of dv/dy by reverse mode: row a of every target's block from one VJP."""
    y = y.clone().requires_grad_(True)
    with torch.enable_grad():
        v = m.velocity(ctx, xt, y, t)
        rows = [torch.autograd.grad(v[..., a].sum(), y, retain_graph=True)[0] for a in range(v.shape[-1])]
    return v.detach(), torch.stack(rows, dim=-2)


@pytest.mark.parametrize("value_layers,activation", [(0, "silu"), (1, "silu"), (1, "relu"), (2, "silu")])
def test_velocity_jacobian_is_the_autograd_jacobian(value_layers, activation):
    m = model(value_layers, activation, velocity="residual")
    xc, yc, xt, yt = data()
    ctx = m.encode_context(xc, yc)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)[:, None].expand(2, 5)
    with torch.no_grad():
        v, jac = m.velocity_jacobian(ctx, xt, yt, t)
    v_ref, jac_ref = autograd_blocks(m, ctx, xt, yt, t)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jac, jac_ref, rtol=1e-9, atol=1e-11)
    assert jac.abs().max() > 1e-3  # not a trivially zero Jacobian


def test_a_target_block_holds_the_whole_jacobian():
    """Independent targets: moving another target's value changes nothing, so the blocks are the Jacobian."""
    m = model(1)
    xc, yc, xt, yt = data(b=1)
    ctx = m.encode_context(xc, yc)
    full = torch.autograd.functional.jacobian(lambda y: m.velocity(ctx, xt, y, 0.4), yt)[0, :, :, 0]  # (n,4,n,4)
    with torch.no_grad():
        _, jac = m.velocity_jacobian(ctx, xt, yt, 0.4)
    off = full.clone()
    for i in range(full.shape[0]):
        torch.testing.assert_close(full[i, :, i], jac[0, i], rtol=1e-9, atol=1e-11)
        off[i, :, i] = 0
    assert off.abs().max() < 1e-12


@pytest.mark.parametrize("group", [None, 1, 3, 100])
def test_attention_tangent_matches_torch_func_jvp(group):
    g = torch.Generator().manual_seed(1)
    b, h, n, nc, dh, nt = 2, 3, 5, 6, 4, 4
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, kc, vc = r(b, h, n, dh), r(b, h, n, dh), r(b, h, n, dh), r(b, h, nc, dh), r(b, h, nc, dh)
    dq, dk, dv = r(nt, b, h, n, dh), r(nt, b, h, n, dh), r(nt, b, h, n, dh)
    mask = torch.cat([torch.ones(n, nc, dtype=torch.bool), torch.eye(n, dtype=torch.bool)], dim=1)

    def attend(q_, k_, v_):  # the masked pass the model's forward runs (math attention: forward AD passes it)
        s = (q_ @ torch.cat([kc, k_], 2).transpose(-1, -2)) * dh ** -0.5
        return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ torch.cat([vc, v_], 2)

    out, d_out = tangents.attention_context_and_self(q, kc, vc, k, v, dq, dk, dv, group=group)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, torch.cat([kc, k], 2), torch.cat([vc, v], 2),
                                                                   attn_mask=mask))
    for j in range(nt):
        _, ref = torch.func.jvp(attend, (q, k, v), (dq[j], dk[j], dv[j]))
        torch.testing.assert_close(d_out[j], ref, rtol=1e-10, atol=1e-12)


def test_unsupported_modules_and_archs_are_refused():
    with pytest.raises(NotImplementedError, match="GELU"):
        tangents.module(torch.nn.GELU(), torch.zeros(2), torch.zeros(1, 2))
    cached = FlowNP(ModelConfig(targets="independent", **TINY)).double()
    assert not cached.has_jacobian_blocks
    xc, yc, xt, yt = data()
    with pytest.raises(NotImplementedError, match="pointwise"):
        cached.velocity_jacobian(cached.encode_context(xc, yc), xt, yt, 0.5)
    assert not model(0, head_neighbours=2).has_jacobian_blocks


@pytest.mark.parametrize("solver", [SolverConfig("midpoint", 3), SolverConfig("euler", 4), SolverConfig("rk4", 2)])
def test_likelihood_by_tangents_equals_the_reverse_mode_trace(solver):
    m = model(1)
    xc, yc, xt, yt = data()
    vf, _ = flow_field(m, xc, yc, xt)
    assert isinstance(vf, Velocity) and vf.jacobian is not None
    fast = log_likelihood_fn(vf, yt, solver=solver, estimator="exact-blocks")
    slow = log_likelihood_fn(vf.fn, yt, solver=solver, estimator="exact-blocks")  # no jacobian: y_dim VJPs
    torch.testing.assert_close(fast.joint, slow.joint, rtol=1e-10, atol=1e-10)
    assert fast.nfe == slow.nfe == solver.nfe()
    # and the public entry point takes the tangent path for this model: one Jacobian per divergence evaluation
    calls = []
    jac = m.velocity_jacobian
    m.velocity_jacobian = lambda *a, **k: calls.append(1) or jac(*a, **k)
    try:
        torch.testing.assert_close(log_likelihood(m, xc, yc, xt, yt, solver=solver, estimator="exact").joint,
                                   fast.joint)
    finally:
        del m.velocity_jacobian
    assert len(calls) == solver.steps * (1 if solver.method == "midpoint" else solver.nfe() // solver.steps)


def test_midpoint_first_stage_skips_the_accumulator_and_changes_nothing():
    calls = {"full": 0, "primal": 0}

    def full(t, s):
        calls["full"] += 1
        return -s[0] * t, (s[0] ** 2).sum(-1, keepdim=True)

    def primal(t, s):
        calls["primal"] += 1
        return -s[0] * t, torch.zeros_like(s[1])

    y0 = (torch.randn(3, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))
    plain = solve(full, y0, 0.0, 1.0, SolverConfig("midpoint", 5))
    calls.update(full=0, primal=0)
    lazy = solve(AugmentedField(full, primal), y0, 0.0, 1.0, SolverConfig("midpoint", 5))
    assert calls == {"full": 5, "primal": 5}
    for a, b in zip(plain.state, lazy.state):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    calls.update(full=0, primal=0)
    solve(AugmentedField(full, primal), y0, 0.0, 1.0, SolverConfig("rk4", 2))  # every rk4 stage is used
    assert calls == {"full": 8, "primal": 0}


def test_checked_flow_checks_before_every_jacobian():
    m = model(1)
    xc, yc, xt, yt = data()
    seen = []
    flow = CheckedFlow(m, lambda: seen.append(1))
    ctx, xs = expand_samples(flow, flow.encode_context(xc, yc), xt, 1)
    with torch.no_grad():
        flow.velocity_jacobian(ctx, xs, yt, 0.5)
    assert len(seen) == 2  # the encoding and the Jacobian
