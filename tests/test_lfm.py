"""Local Flow Matching and distillation (flownp.core.lfm) against closed forms.

A Gaussian data law y ~ N(m, s^2) per element: block n's marginals are Gaussian, N(mu_n, v_n) with
mu_n = a_n mu_{n-1}, v_n = a_n^2 v_{n-1} + 1 - a_n^2, and its optimal velocity on the path
y_t = t x_l + (1 - t) x_r is affine in y: v*(t, y) = (1 - a) mu_l + C(t) / V(t) (y - alpha mu_l), with
alpha = t + (1 - t) a, beta = (1 - t) sqrt(1 - a^2), V = alpha^2 v_l + beta^2, C = (1 - a) alpha v_l - sqrt(1 - a^2) beta.
The blocks' composed data -> noise map is then the affine y -> mu_N + sqrt(v_N) (y - m) / s, so the model's
exact log-density is log N(that; 0, 1) + log(sqrt(v_N) / s) per element.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flownp.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from flownp.core.config import ModelConfig
from flownp.core.lfm import (LFM, DistillConfig, DistilledSampler, LFMConfig, block_loss, describe,
                             distill_loss, teacher_trajectory)
from flownp.core.likelihood import log_likelihood
from flownp.core.model import FlowNP
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig

M, S = 0.8, 0.5  # the data law, per element
IND = ModelConfig(targets="independent", y_dim=2, d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16,
                  head_hidden=32, space_freqs=2, time_freqs=4)


def marginals(cfg: LFMConfig) -> list[tuple[float, float]]:
    """(mu_n, v_n) for n = 0..N."""
    out = [(M, S * S)]
    for n in range(cfg.n_blocks):
        a = cfg.ou_factor(n)
        mu, v = out[-1]
        out.append((a * mu, a * a * v + 1 - a * a))
    return out


class NoContext:
    """What a closed-form field's encode_context returns: nothing to reuse, repeated for S samples."""

    def repeat(self, n: int) -> "NoContext":
        return self


class GaussianBlock(nn.Module):
    """The optimal velocity of one LFM block for Gaussian x_l ~ N(mu_l, v_l): a closed-form field."""

    def __init__(self, mu_l: float, v_l: float, a: float) -> None:
        super().__init__()
        self.mu, self.v, self.a = mu_l, v_l, a

    def encode_context(self, xc: torch.Tensor, yc: torch.Tensor) -> NoContext:
        return NoContext()

    def velocity(self, ctx: object, xt: torch.Tensor, y: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=y.dtype)
        a, b = self.a, math.sqrt(1 - self.a**2)
        al, be = t + (1 - t) * a, (1 - t) * b
        var, cov = al**2 * self.v + be**2, (1 - a) * al * self.v - b * be
        return (1 - a) * self.mu + cov / var * (y - al * self.mu)


def gaussian_lfm(cfg: LFMConfig) -> LFM:
    mv = marginals(cfg)
    return LFM(IND, cfg, [GaussianBlock(*mv[n], cfg.ou_factor(n)) for n in range(cfg.n_blocks)]).double()


def exact_model_ll(cfg: LFMConfig, y: torch.Tensor) -> torch.Tensor:
    """(B,) the optimal blocks' exact log-density of y (B, n, D)."""
    mu_n, v_n = marginals(cfg)[-1]
    z = mu_n + math.sqrt(v_n) * (y - M) / S
    per = -0.5 * z**2 - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(v_n) - math.log(S)
    return per.flatten(1).sum(1)


def data_ll(y: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((y - M) / S) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(S)).flatten(1).sum(1)


def task(b: int = 3, n: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    xc = torch.rand(b, 6, 2, generator=g, dtype=dtype) * 4
    yc = torch.randn(b, 6, 2, generator=g, dtype=dtype)
    xt = torch.rand(b, n, 2, generator=g, dtype=dtype) * 4
    yt = M + S * torch.randn(b, n, 2, generator=g, dtype=dtype)
    return xc, yc, xt, yt


def test_config_round_trips_and_refuses_bad_settings():
    c = LFMConfig(n_blocks=3, gamma_c=0.5, gamma_rho=1.5, push_method="rk4", push_steps=2)
    assert LFMConfig.from_dict(c.to_dict()) == c
    assert c.gammas() == pytest.approx((0.5, 0.75, 1.125)) and c.total_time() == pytest.approx(2.375)
    assert c.ou_factor(1) == pytest.approx(math.exp(-0.75))
    d = DistillConfig(group=2, segments=8, teacher_steps=3)
    assert DistillConfig.from_dict(d.to_dict()) == d
    with pytest.raises(ValueError, match="unknown"):
        LFMConfig.from_dict({**c.to_dict(), "nblocks": 2})
    for bad in (dict(n_blocks=0), dict(gamma_c=0.0), dict(push_method="dopri5")):
        with pytest.raises(ValueError):
            LFMConfig(**bad)
    with pytest.raises(ValueError, match="does not divide"):
        DistilledSampler(LFM(IND, LFMConfig(n_blocks=3)), DistillConfig(group=2))


@pytest.mark.parametrize("estimator", ["exact-blocks", "hutchinson"])
def test_composed_likelihood_of_the_optimal_blocks_is_the_closed_form(estimator):
    cfg = LFMConfig(n_blocks=3, gamma_c=0.5, gamma_rho=2.0)
    lfm = gaussian_lfm(cfg)
    xc, yc, xt, yt = task()
    res = lfm.flow_log_likelihood(xc, yc, xt, yt, solver=SolverConfig("rk4", 32), estimator=estimator, n_probes=64)
    want = exact_model_ll(cfg, yt)
    # a diagonal Jacobian: Rademacher probes give its trace exactly too
    torch.testing.assert_close(res.joint, want, atol=1e-6, rtol=0)
    assert res.nfe == 3 * 32 * 4 and res.density == "exact flow"
    # and the blocks undo the data law: with total OU time 3.5 the model is the data law within 0.02 nats
    assert (res.joint - data_ll(yt)).abs().max() / yt[0].numel() < 0.02
    # generation backwards through the blocks lands on the data law's moments
    z = torch.randn(1, 4000, 1, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, nfe = lfm.flow_samples(xc[:1], yc[:1], xt[:1, :1], z, SolverConfig("rk4", 8))
    mu_n, v_n = marginals(cfg)[-1]
    want_mean, want_std = M + (0 - mu_n) * S / math.sqrt(v_n), S / math.sqrt(v_n)
    assert abs(out.mean().item() - want_mean) < 0.02 and abs(out.std().item() - want_std) < 0.02
    assert nfe == 3 * 8 * 4


def test_the_composed_flow_inverts():
    torch.manual_seed(0)
    lfm = LFM(ModelConfig(**{**IND.to_dict(), "targets": "joint"}), LFMConfig(n_blocks=3)).double()
    xc, yc, xt, _ = task()
    z = torch.randn(3, 2, 5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver = SolverConfig("rk4", 32)
    y, _ = lfm.flow_samples(xc, yc, xt, z, solver)
    assert (y - z).abs().max() > 0.05  # the random blocks move the state ...
    torch.testing.assert_close(lfm.encode(xc, yc, xt, y, solver), z, atol=1e-7, rtol=0)  # ... and encode undoes it


def test_trained_blocks_match_the_exact_gaussian_log_density():
    """Tiny FlowNP blocks trained by block_loss (sequentially, each on the push-forward through the trained
    ones) compose to the closed-form density within 0.05 nats per element."""
    torch.manual_seed(0)
    cfg = LFMConfig(n_blocks=2, gamma_c=0.5, gamma_rho=2.0, push_method="midpoint", push_steps=4)
    lfm = LFM(IND, cfg)
    g = torch.Generator().manual_seed(3)
    for n in range(cfg.n_blocks):
        opt = torch.optim.Adam(lfm.blocks[n].parameters(), lr=3e-3)
        for step in range(300):
            xc, yc, xt, yt = task(b=8, n=16, seed=100 + step, dtype=torch.float32)
            loss = block_loss(lfm, n, xc, yc, xt, yt, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    xc, yc, xt, yt = task(b=8, n=16, seed=7, dtype=torch.float32)
    with torch.no_grad():
        untrained = LFM(IND, cfg).flow_log_likelihood(xc, yc, xt, yt, solver=SolverConfig("midpoint", 16))
    res = lfm.flow_log_likelihood(xc, yc, xt, yt, solver=SolverConfig("midpoint", 16))
    assert res.estimator == "exact-blocks"
    per_el = lambda ll: ll.mean().item() / yt[0].numel()  # noqa: E731
    want = per_el(exact_model_ll(cfg, yt.double()))
    assert abs(per_el(res.joint) - want) < 0.05, (per_el(res.joint), want)
    assert abs(per_el(untrained.joint) - want) > 0.2  # the check can fail: untrained blocks are far off


class Affine(nn.Module):
    """A student net whose one-step map y + h * (w y + c) is affine per element."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.c = nn.Parameter(torch.zeros((), dtype=torch.float64)), nn.Parameter(torch.zeros((), dtype=torch.float64))

    def encode_context(self, xc: torch.Tensor, yc: torch.Tensor) -> NoContext:
        return NoContext()

    def velocity(self, ctx: NoContext, xt: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
        return self.w * y + self.c


@pytest.mark.parametrize("group", [1, 2])
def test_a_distilled_map_reproduces_its_teachers_map_on_a_linear_case(group):
    """The Gaussian LFM's blocks are affine maps: each distilled (k-block) map must become the teacher's
    composed affine map, whose slope and offset are known in closed form."""
    cfg = LFMConfig(n_blocks=2, gamma_c=0.3, gamma_rho=2.0)
    teacher = gaussian_lfm(cfg)
    dc = DistillConfig(group=group, teacher_method="rk4", teacher_steps=8)
    student = DistilledSampler(teacher, dc, maps=[Affine() for _ in range(cfg.n_blocks // group)])
    opt = torch.optim.Adam(student.maps.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    xc, yc, xt, yt = task(b=4, n=8)
    for _ in range(400):
        loss = distill_loss(student, xc, yc, xt, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mv = marginals(cfg)
    for j, m in enumerate(student.maps):  # map j: from marginal N - j k to N - (j + 1) k (generation order)
        (mu_in, v_in), (mu_out, v_out) = mv[cfg.n_blocks - j * group], mv[cfg.n_blocks - (j + 1) * group]
        slope = math.sqrt(v_out / v_in)
        assert 1 + m.w.item() == pytest.approx(slope, abs=2e-3)
        assert m.c.item() == pytest.approx(mu_out - slope * mu_in, abs=2e-3)
    # its likelihood is the teacher's, and says so; it has no exact density
    res = log_likelihood(student, xc, yc, xt, yt, solver=SolverConfig("rk4", 8), estimator="exact-blocks")
    torch.testing.assert_close(res.joint, teacher.flow_log_likelihood(xc, yc, xt, yt, solver=SolverConfig("rk4", 8)).joint)
    assert res.density.startswith("teacher's") and not student.exact_density and describe(student)["exact_density"] is False
    assert sample(student, xc, yc, xt, n_samples=2).nfe == cfg.n_blocks // group


def test_distilled_global_flow_starts_as_the_teachers_euler_step_and_pairs_follow_its_ode():
    torch.manual_seed(1)
    teacher = FlowNP(IND).double().eval()
    dc = DistillConfig(group=2, segments=4, teacher_method="rk4", teacher_steps=4)
    student = DistilledSampler(teacher, dc)
    assert student.times == [(0.0, 0.5), (0.5, 0.5)]
    xc, yc, xt, _ = task()
    z = torch.randn(3, 2, 5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    traj = teacher_trajectory(teacher, xc, yc, xt, z, dc)
    full = sample(teacher, xc, yc, xt, y0=z, solver=SolverConfig("rk4", 16)).samples
    torch.testing.assert_close(traj[-1], full, atol=1e-10, rtol=0)  # 4 segments x rk4(4) = rk4(16)
    # untrained, the 2 maps are 2 Euler steps of the teacher
    euler2 = sample(teacher, xc, yc, xt, y0=z, solver=SolverConfig("euler", 2)).samples
    torch.testing.assert_close(student.flow_samples(xc, yc, xt, z)[0], euler2, atol=1e-12, rtol=0)
    assert distill_loss(student, xc, yc, xt, torch.Generator().manual_seed(0)).item() > 0


def test_checkpoints_rebuild_every_block_and_map(tmp_path):
    torch.manual_seed(2)
    lfm = LFM(IND, LFMConfig(n_blocks=2))
    dist = DistilledSampler(lfm, DistillConfig(group=2))
    xc, yc, xt, _ = task(dtype=torch.float32)
    z = torch.randn(3, 1, 5, 2, generator=torch.Generator().manual_seed(4))
    for m, extra in ((lfm, {"lfm_config": lfm.lfm_config.to_dict()}),
                     (dist, {"distill": {"config": dist.distill_config.to_dict(),
                                         "teacher_lfm_config": lfm.lfm_config.to_dict()}})):
        with torch.no_grad():  # make the maps differ from the teacher's blocks
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        save_checkpoint(tmp_path / "m.pt", {"kind": m.kind, "model_config": IND.to_dict(), "model": m.state_dict(),
                                            **extra})
        back = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
        assert type(back) is type(m)
        torch.testing.assert_close(back.flow_samples(xc, yc, xt, z, SolverConfig("euler", 2))[0],
                                   m.flow_samples(xc, yc, xt, z, SolverConfig("euler", 2))[0], atol=0, rtol=0)


# ---- the jobs -------------------------------------------------------------------------------------
def _cfg(**kw):
    from flownp.jobs.train import TrainConfig

    base = dict(steps=4, batch_size=2, n_ctx_min=30, n_ctx_max=40, n_tgt=10, warmup=1, ckpt_every=2, log_every=1,
                val_batches=1, seed=3)
    return TrainConfig(**{**base, **kw})


JOB_MODEL = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16, head_hidden=16)
JOB_LFM = LFMConfig(n_blocks=2, push_method="euler", push_steps=1)


def test_lfm_training_resumes_exactly_mid_block_and_trains_blocks_in_sequence(tiny_store, tmp_path):
    from flownp.jobs.lfm import LFMTrainer
    from ingest.store import Store

    store = Store.open(tiny_store)
    full = LFMTrainer(store, tmp_path / "full", JOB_MODEL, JOB_LFM, _cfg())
    before = [p.clone() for p in full.model.parameters()]
    full.run_blocks(progress=False)
    crashed = LFMTrainer(store, tmp_path / "part", JOB_MODEL, JOB_LFM, _cfg())
    crashed.run_blocks(progress=False, stop_at=(1, 3))  # "crashes" in block 2 at step 3; last.pt: block 2, step 2
    resumed = LFMTrainer(store, tmp_path / "part", JOB_MODEL, JOB_LFM, _cfg())
    resumed.resume(tmp_path / "part" / "last.pt")
    assert (resumed.block, resumed.step) == (1, 2)
    resumed.run_blocks(progress=False)
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(pa, pb)
    assert all(not torch.equal(a, b) for a, b in zip(before, full.model.parameters()))  # every block trained
    # block1.pt holds block 1 trained and block 2 untouched; best.pt rebuilds both blocks
    b1 = load_checkpoint(tmp_path / "full" / "block1.pt")
    assert b1["lfm_block"] == 1 and b1["lfm_config"] == JOB_LFM.to_dict()
    first, n0 = model_from_checkpoint(b1), len(list(full.model.blocks[0].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first.blocks[0].parameters(), full.model.blocks[0].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first.blocks[1].parameters(), before[n0:]))
    best = model_from_checkpoint(load_checkpoint(tmp_path / "full" / "best.pt"))
    assert isinstance(best, LFM)
    for pa, pb in zip(best.parameters(), full.ema.parameters()):
        assert torch.equal(pa, pb)


def test_cli_train_lfm_then_distill_it(tiny_store, tmp_path):
    from typer.testing import CliRunner

    from flownp.jobs.cli import app
    from ingest.store import Store
    from ingest.tasks import TaskConfig, TaskSampler

    tiny = ["--steps", "2", "--batch-size", "2", "--n-ctx", "30-40", "--n-tgt", "10", "--warmup", "1", "--ckpt-every",
            "2", "--quiet"]
    run = CliRunner()
    r = run.invoke(app, ["train-lfm", "--data", str(tiny_store), "--out", str(tmp_path / "lfm"), "--n-blocks", "2",
                         "--gamma-c", "0.5", "--push-steps", "1", "--d-model", "16", "--n-layers", "1", *tiny])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["blocks_done"] == 2
    r = run.invoke(app, ["distill", "--from", str(tmp_path / "lfm" / "best.pt"), "--data", str(tiny_store), "--out",
                         str(tmp_path / "dist"), "--group", "2", "--teacher-steps", "2", *tiny])
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(tmp_path / "dist" / "last.pt")
    assert ck["exact_density"] is False and ck["distill"]["teacher_lfm_config"]["n_blocks"] == 2
    m = model_from_checkpoint(ck)
    assert isinstance(m, DistilledSampler) and isinstance(m.teacher, LFM) and len(m.maps) == 1
    store = Store.open(tiny_store)
    _, test = store.load("test")
    b = TaskSampler(test, store.region.circle_xy, TaskConfig(30, 30, 8, 2, seed=1))[0]
    assert sample(m, b.xc, b.yc, b.xt, n_samples=2).nfe == 1
    res = log_likelihood(m, b.xc, b.yc, b.xt, b.yt, solver=SolverConfig("euler", 2), estimator="hutchinson")
    assert res.density.startswith("teacher's (lfm)") and torch.isfinite(res.joint).all()
    r = run.invoke(app, ["distill", "--from", str(tmp_path / "dist" / "last.pt"), "--data", str(tiny_store), "--out",
                         str(tmp_path / "bad"), "--steps", "1", "--quiet"])
    assert r.exit_code == 2 and "not a GAV or distilled" in r.output
