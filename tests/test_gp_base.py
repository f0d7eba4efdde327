"""The per-task transforms (flownp.core.gp_base) and a FlowNP on them: exact round trips and Jacobians,
the GP base's density against scipy, shift/scale and permutation equivariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal

from flownp.core.config import ModelConfig
from flownp.core.gp_base import GPFitSettings, fit_hyper, gp_posterior, kernel, standardiser, task_transform
from flownp.core.likelihood import log_likelihood, samples_log_likelihood
from flownp.core.model import FlowNP
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig

TINY = dict(d_model=16, n_heads=2, n_layers=1, d_ff=16, embed_hidden=16, embed_layers=2, head_hidden=16,
            space_freqs=4, time_freqs=2)


def _task(seed: int = 0, n_ctx: int = 40, n_tgt: int = 12, b: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    xc, xt = torch.rand(b, n_ctx, 2, generator=g) * 16 - 8, torch.rand(b, n_tgt, 2, generator=g) * 16 - 8
    f = lambda x: torch.stack([torch.sin(x[..., 0] / 3) + x[..., 1] / 5, torch.cos(x[..., 1] / 2),  # noqa: E731
                               x[..., 0] / 10, torch.sin(x.sum(-1) / 4)], -1)
    yc = 2.0 * f(xc) + 0.05 * torch.randn(b, n_ctx, 4, generator=g) + 1.0
    yt = 2.0 * f(xt) + 0.05 * torch.randn(b, n_tgt, 4, generator=g) + 1.0
    return xc, yc, xt, yt


def _model(**kw) -> FlowNP:
    torch.manual_seed(0)
    return FlowNP(ModelConfig(targets="independent", **TINY, **kw)).double()


@settings(max_examples=25, deadline=None)
@given(st.floats(-5, 5), st.floats(0.2, 20), st.integers(0, 1000))
def test_standardisation_round_trip_and_jacobian(shift, scale, seed):
    xc, yc, xt, yt = (a.double() for a in _task(seed))
    tr = task_transform(xc, yc, xt, standardise="context", base="standard", whitening="symmetric", floor=1e-3,
                        settings=GPFitSettings())
    eps = tr.forward(yt)
    assert torch.allclose(tr.inverse(eps), yt, atol=1e-10)
    # the Jacobian of y -> (y - loc) / scale is -n sum log scale, per task
    assert torch.allclose(tr.log_jacobian(), -yt.shape[1] * torch.log(tr.scale).sum((-1, -2)))
    # a task shifted and scaled as a whole gives the same standardised values
    tr2 = task_transform(xc, yc * scale + shift, xt, standardise="context", base="standard", whitening="symmetric",
                         floor=1e-3, settings=GPFitSettings())
    assert torch.allclose(tr2.forward(yt * scale + shift), eps, atol=1e-8)
    assert torch.allclose(tr2.log_jacobian(), tr.log_jacobian() - yt.shape[1] * 4 * math.log(scale), atol=1e-8)


def test_standardisation_floor_keeps_a_constant_context_finite():
    yc = torch.ones(1, 30, 4, dtype=torch.float64)
    loc, scale = standardiser(yc, "context", 0.05)
    assert torch.all(scale == 0.05) and torch.all(loc == 1.0)


@pytest.mark.parametrize("whitening", ["symmetric", "diagonal"])
def test_gp_base_round_trip(whitening):
    xc, yc, xt, yt = (a.double() for a in _task(1))
    tr = task_transform(xc, yc, xt, standardise="context", base="gp", whitening=whitening, floor=0.05,
                        settings=GPFitSettings())
    assert torch.allclose(tr.inverse(tr.forward(yt)), yt, atol=1e-8)
    # the Jacobian is exact: compare with autograd's log|det| of the bijection, task 0
    jac = torch.autograd.functional.jacobian(lambda y: tr.forward(y[None].expand(2, -1, -1))[0].reshape(-1),
                                             yt[0])
    sign, logabs = torch.linalg.slogdet(jac.reshape(yt[0].numel(), -1))
    assert abs(float(logabs) - float(tr.log_jacobian()[0])) < 1e-6


def test_zero_velocity_on_gp_base_is_the_gp_joint_density():
    """An untrained residual model is exactly its base: log p = the fitted GP's joint density (scipy)."""
    xc, yc, xt, yt = (a.double() for a in _task(2))
    model = _model(standardise="context", base="gp", velocity="residual")
    res = log_likelihood(model, xc, yc, xt, yt, solver=SolverConfig("euler", 4), estimator="exact")
    stt = GPFitSettings()
    loc, scale = standardiser(yc, "context", 0.05)
    zc, zt = (yc - loc) / scale, (yt - loc) / scale
    hyp = fit_hyper(xc, zc, stt)
    for i in range(2):
        want = 0.0
        for j in range(4):
            kind, ell, s2, noise = stt.kernels[int(hyp.kind[i, j])], hyp.ell[i, j], hyp.s2[i, j], hyp.noise[i, j]
            x = torch.cat([xc[i], xt[i]])
            d2 = (x[:, None] - x[None]).pow(2).sum(-1)
            k = (s2 * kernel(d2, ell, kind) + noise * torch.eye(len(x), dtype=torch.float64)).numpy()
            n = xc.shape[1]
            m = k[n:, :n] @ np.linalg.solve(k[:n, :n], zc[i, :, j].numpy())
            c = k[n:, n:] - k[n:, :n] @ np.linalg.solve(k[:n, :n], k[:n, n:])
            want += multivariate_normal(m, c).logpdf(zt[i, :, j].numpy()) - xt.shape[1] * math.log(float(scale[i, 0, j]))
        assert abs(float(res.joint[i]) - want) < 1e-6, (float(res.joint[i]), want)


def test_zero_velocity_samples_are_gp_posterior_samples():
    xc, yc, xt, _ = (a.double() for a in _task(3, n_tgt=6, b=1))
    model = _model(standardise="context", base="gp", velocity="residual")
    s = sample(model, xc, yc, xt, n_samples=4000, solver=SolverConfig("euler", 4),
               generator=torch.Generator().manual_seed(0)).samples[0]  # (S, n, D)
    tr = model.task_transform(xc, yc, xt)
    mean = tr.inverse(torch.zeros(1, 6, 4, dtype=torch.float64))[0]
    assert torch.allclose(s.mean(0), mean, atol=4 * float(s.std(0).max()) / math.sqrt(4000))
    cov = tr.base.w_inv[0, 0] @ tr.base.w_inv[0, 0] * tr.scale[0, 0, 0] ** 2
    emp = torch.cov(s[:, :, 0].T)
    assert torch.allclose(emp, cov, atol=0.1 * float(cov.diagonal().max()))


def test_gp_base_is_permutation_equivariant():
    """Permuting the context and the targets permutes the samples' law and keeps the likelihood."""
    xc, yc, xt, yt = (a.double() for a in _task(4, n_ctx=300, n_tgt=10))
    model = _model(standardise="context", base="gp", velocity="residual", gp_fit_points=64)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)  # a non-zero flow
    ll = log_likelihood(model, xc, yc, xt, yt, solver=SolverConfig("euler", 4), estimator="exact").joint
    pc, pt = torch.randperm(300), torch.randperm(10)
    ll2 = log_likelihood(model, xc[:, pc], yc[:, pc], xt[:, pt], yt[:, pt], solver=SolverConfig("euler", 4),
                         estimator="exact").joint
    assert torch.allclose(ll, ll2, atol=1e-6)
    y0 = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    s1 = sample(model, xc, yc, xt, n_samples=3, solver=SolverConfig("euler", 4), y0=y0).samples
    s2 = sample(model, xc[:, pc], yc[:, pc], xt[:, pt], n_samples=3, solver=SolverConfig("euler", 4),
                y0=y0[:, :, pt]).samples
    # symmetric whitening: permuting the noise with the targets permutes the samples
    assert torch.allclose(s1[:, :, pt], s2, atol=1e-6)


def test_shift_and_scale_of_a_task_moves_samples_and_likelihood_by_the_jacobian():
    xc, yc, xt, yt = (a.double() for a in _task(5))
    model = _model(standardise="context", base="gp", velocity="residual")
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    a, b = 3.0, -2.0
    kw = dict(solver=SolverConfig("euler", 4), estimator="exact")
    ll = log_likelihood(model, xc, yc, xt, yt, **kw).joint
    ll2 = log_likelihood(model, xc, a * yc + b, xt, a * yt + b, **kw).joint
    assert torch.allclose(ll2, ll - yt.shape[1] * 4 * math.log(a), atol=1e-6)
    y0 = torch.randn(2, 2, yt.shape[1], 4, dtype=torch.float64)
    s = sample(model, xc, yc, xt, n_samples=2, solver=SolverConfig("euler", 4), y0=y0).samples
    s2 = sample(model, xc, a * yc + b, xt, n_samples=2, solver=SolverConfig("euler", 4), y0=y0).samples
    assert torch.allclose(s2, a * s + b, atol=1e-6)


def test_gp_fit_prefers_the_true_length_scale():
    """Data drawn from a GP with a known length scale: the grid's choice is near it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 200, 2, generator=g, dtype=torch.float64) * 20 - 10
    d2 = (x[0, :, None] - x[0, None]).pow(2).sum(-1)
    k = kernel(d2, torch.tensor(4.0, dtype=torch.float64), "se") + 1e-4 * torch.eye(200, dtype=torch.float64)
    z = (torch.linalg.cholesky(k) @ torch.randn(200, 4, generator=g, dtype=torch.float64))[None]
    hyp = fit_hyper(x, z, GPFitSettings(kernels=("se",)))
    assert torch.all((hyp.ell > 2.5) & (hyp.ell < 6.5)), hyp.ell


def test_bad_settings_are_refused():
    for kw, msg in [({"base": "gauss"}, "base"), ({"standardise": "yes"}, "standardise"),
                    ({"whitening": "chol"}, "whitening"), ({"gp_kernels": "rbf"}, "gp_kernels"),
                    ({"velocity": "zero"}, "velocity"), ({"standardise_floor": 0.0}, "floor")]:
        with pytest.raises(ValueError, match=msg):
            ModelConfig(**kw)


def test_untrained_residual_model_is_the_identity_flow_on_a_standard_base():
    """velocity='residual' with a zero head: samples are the noise itself (the drift's flow is the identity)."""
    xc, yc, xt, _ = (a.double() for a in _task(6))
    model = _model(velocity="residual")
    y0 = torch.randn(2, 2, xt.shape[1], 4, dtype=torch.float64)
    s = sample(model, xc, yc, xt, n_samples=2, solver=SolverConfig("rk4", 32), y0=y0).samples
    assert torch.allclose(s, y0, atol=1e-5)


def test_scaled_frame_target_vanishes_in_expectation_for_gaussian_data():
    """For N(0, I) data the residual frame's regression target has conditional mean 0 given (u, t): a least
    squares fit of the target on u within t-bins has slope ~0 (the plain frame's slope is (2t-1)/sigma^2)."""
    from flownp.core.paths import path_scale, sample_path, scaled_frame

    g = torch.Generator().manual_seed(0)
    y1 = torch.randn(1, 200_000, 1, generator=g, dtype=torch.float64)
    plain = sample_path(y1, generator=g)
    frame = scaled_frame(plain)
    t = plain.t[0]
    for lo in (0.05, 0.45, 0.85):
        m = (t > lo) & (t < lo + 0.1)
        u, tgt, y, v = frame.yt[0, m, 0], frame.target[0, m, 0], plain.yt[0, m, 0], plain.target[0, m, 0]
        assert abs(float((u * tgt).mean() / (u * u).mean())) < 0.02
        tm = float(t[m].mean())
        slope = float((y * v).mean() / (y * y).mean())
        assert abs(slope - (2 * tm - 1) / float(path_scale(torch.tensor(tm))) ** 2) < 0.05
    # at t = 0 and t = 1 the frame is the identity on the state (sigma = 1)
    edge = sample_path(y1[:, :4], generator=g)
    edge.t[:] = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    edge.yt[:] = torch.where(edge.t[..., None] == 0, -y1[:, :4], y1[:, :4])
    assert torch.equal(scaled_frame(edge).yt, edge.yt)


def test_gp_base_model_trains_and_fine_tunes(tiny_store, tmp_path):
    """Pretraining and MLE fine-tuning run in the flow space of a GP-base model (finite losses), and the
    checkpoint rebuilds a GP-base model."""
    from flownp.checkpoint import load_checkpoint, model_from_checkpoint
    from flownp.jobs.finetune import FinetuneConfig, FineTuner
    from flownp.jobs.train import TrainConfig, Trainer
    from ingest.store import Store

    cfg = ModelConfig(targets="independent", standardise="context", base="gp", velocity="residual",
                      gp_fit_points=64, **TINY)
    tc = TrainConfig(steps=8, batch_size=4, n_ctx_min=60, n_ctx_max=60, n_tgt=24, warmup=2, ckpt_every=8,
                     log_every=1, val_batches=1, seed=3, lr=2e-3)
    tr = Trainer(Store.open(tiny_store), tmp_path / "run", cfg, tc)
    tr.run(progress=False)
    import json

    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "log.jsonl") if '"loss"' in line]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "last.pt")).double()
    assert model.config.base == "gp"
    ft = FineTuner(Store.open(tiny_store), tmp_path / "ft", tmp_path / "run" / "last.pt",
                   FinetuneConfig(k_steps=2), TrainConfig(steps=3, batch_size=2, n_ctx_min=60, n_ctx_max=60,
                                                          n_tgt=16, warmup=1, ckpt_every=3, log_every=1,
                                                          val_batches=1, lr=1e-4, schedule="constant"))
    ft.run(progress=False)
    assert (tmp_path / "ft" / "last.pt").exists()


@pytest.mark.parametrize("arch", ["cached", "pointwise"])
def test_a_repeated_transform_scores_samples_as_a_fresh_one(arch):
    """Scoring S samples of one task with the task's transform repeated gives what fitting it per copy gives,
    and so does samples_log_likelihood (one context encoding for the S samples)."""
    xc, yc, xt, _ = (a.double() for a in _task(7, b=2))
    model = _model(standardise="context", base="gp", velocity="residual", arch=arch)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    tr = model.task_transform(xc, yc, xt)
    s = sample(model, xc, yc, xt, n_samples=3, solver=SolverConfig("euler", 4), transform=tr,
               generator=torch.Generator().manual_seed(1)).samples  # (2, 3, n, D)
    kw = dict(solver=SolverConfig("euler", 4), estimator="exact")
    rep = lambda a: a.repeat_interleave(3, dim=0)  # noqa: E731  (copy index fastest)
    flat = s.reshape(6, *s.shape[2:])
    fast = log_likelihood(model, rep(xc), rep(yc), rep(xt), flat, transform=tr.repeat(3), **kw).joint
    slow = log_likelihood(model, rep(xc), rep(yc), rep(xt), flat, **kw).joint
    assert torch.allclose(fast, slow, atol=1e-9)
    shared = samples_log_likelihood(model, xc, yc, xt, s, transform=tr, **kw).joint
    assert torch.allclose(shared, slow, atol=1e-9)
    # the copies share the task's whitening: nothing of size n_t x n_t per copy
    assert tr.repeat(3).base.w.shape[0] == 2


def test_degenerate_contexts_stay_finite():
    """A constant variable, a single context point and two context points give finite, invertible transforms
    (the signal variance floor and the two-point median/MAD)."""
    g = torch.Generator().manual_seed(8)
    xt = torch.rand(1, 5, 2, generator=g, dtype=torch.float64) * 10
    yt = torch.randn(1, 5, 4, generator=g, dtype=torch.float64)
    for n in (1, 2, 30):
        xc = torch.rand(1, n, 2, generator=g, dtype=torch.float64) * 10
        yc = torch.randn(1, n, 4, generator=g, dtype=torch.float64)
        yc[..., 3] = 0.7  # a constant variable
        tr = task_transform(xc, yc, xt, standardise="context", base="gp", whitening="symmetric", floor=0.05,
                            settings=GPFitSettings())
        assert torch.isfinite(tr.log_jacobian()).all() and torch.allclose(tr.inverse(tr.forward(yt)), yt, atol=1e-6)
    # two context points: the median is their mean and the spread is half their distance (x 1.4826), not the floor
    yc2 = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]], dtype=torch.float64)
    loc, scale = standardiser(yc2, "context", 0.05)
    assert torch.allclose(loc, torch.ones_like(loc)) and torch.allclose(scale, torch.full_like(scale, 1.4826))


def test_fit_subset_ignores_the_order_of_repeated_locations():
    """Repeated locations with different values straddling the subset's cut-off: the same set is kept."""
    g = torch.Generator().manual_seed(9)
    x = torch.rand(1, 40, 2, generator=g, dtype=torch.float64)
    x = torch.cat([x, x], 1)  # every location twice
    y = torch.randn(1, 80, 4, generator=g, dtype=torch.float64)
    want = None
    for seed in range(10):
        p = torch.randperm(80, generator=torch.Generator().manual_seed(seed))
        from flownp.core.gp_base import invariant_subset

        idx = invariant_subset(x[:, p], y[:, p], 41)
        kept = sorted(map(tuple, torch.cat([x[:, p], y[:, p]], -1)[0, idx[0]].tolist()))
        want = want or kept
        assert kept == want
