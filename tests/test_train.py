"""Pretraining: exact resume, checkpoints that rebuild the model, and a short run that learns."""

import json
import math

import pytest
import torch

from flownp.checkpoint import load_checkpoint, model_from_checkpoint
from flownp.core.config import ModelConfig
from flownp.core.likelihood import log_likelihood
from flownp.core.solvers import SolverConfig
from flownp.jobs.train import TrainConfig, Trainer, lr_at
from ingest.store import Store
from ingest.tasks import TaskConfig, TaskSampler

TINY = ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, embed_hidden=32, head_hidden=64)


def cfg(**kw):
    base = dict(steps=8, batch_size=2, n_ctx_min=40, n_ctx_max=60, n_tgt=20, warmup=2, ckpt_every=4,
                log_every=1, val_batches=1, seed=3)
    return TrainConfig(**{**base, **kw})


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_resume_continues_exactly(tiny_store, tmp_path):
    store = Store.open(tiny_store)
    full = Trainer(store, tmp_path / "full", TINY, cfg())
    full.run(progress=False)
    crashed = Trainer(store, tmp_path / "part", TINY, cfg())
    crashed.run(progress=False, stop_at=6)  # "crashes" after step 6; its last checkpoint is step 4
    resumed = Trainer(store, tmp_path / "part", TINY, cfg())
    resumed.resume(tmp_path / "part" / "last.pt")
    assert resumed.step == 4
    resumed.run(progress=False)
    a, b = losses(tmp_path / "full" / "log.jsonl"), losses(tmp_path / "part" / "log.jsonl")
    assert b[7] == a[7] and b[8] == a[8]  # bitwise equal losses after the resume
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(pa, pb)


def test_checkpoint_is_self_describing(tiny_store, tmp_path):
    t = Trainer(Store.open(tiny_store), tmp_path, TINY, cfg(steps=2, ckpt_every=2))
    t.run(progress=False)
    ck = load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    assert ck["model_config"] == TINY.to_dict() and ck["step"] == 2
    assert ck["normalizer"] == Store.open(tiny_store).normalizer.to_dict()
    assert ck["region"]["name"] == "memphis" and ck["versions"]["torch"] == torch.__version__
    m = model_from_checkpoint(ck, ema=False)
    for pa, pb in zip(m.parameters(), t.model.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="not a flownp-weather-checkpoint"):
        torch.save({"x": 1}, tmp_path / "foreign.pt")
        load_checkpoint(tmp_path / "foreign.pt")


def test_lr_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, warmup=10, lr=1e-3)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(55, c) == pytest.approx(0.5e-3, rel=1e-6) and lr_at(100, c) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_short_training_beats_the_prior(tiny_store, tmp_path):
    c = cfg(steps=400, batch_size=8, lr=2e-3, warmup=10, ckpt_every=400, n_ctx_min=100, n_ctx_max=100,
            n_tgt=40, ema_decay=0.95, log_every=50)
    t = Trainer(Store.open(tiny_store), tmp_path, TINY, c)
    t.run(progress=False)
    _, test = Store.open(tiny_store).load("test")
    b = TaskSampler(test, Store.open(tiny_store).region.circle_xy, TaskConfig(100, 100, 40, 8, seed=11))[0]
    res = log_likelihood(t.ema, b.xc, b.yc, b.xt, b.yt, solver=SolverConfig("midpoint", 20))
    prior = (-0.5 * b.yt.pow(2) - 0.5 * math.log(2 * math.pi)).sum((1, 2)) / 40
    gain = float((res.per_point - prior).mean())
    # nats per target point over N(0, I) (about 0.9 measured; an untrained model scores about 0)
    assert gain > 0.5, gain


def test_resume_on_a_changed_store_warns_and_on_a_changed_normaliser_refuses(tiny_store, tmp_path, caplog):
    from flownp.checkpoint import save_checkpoint

    store = Store.open(tiny_store)
    t = Trainer(store, tmp_path / "run", TINY, cfg(steps=2, ckpt_every=2))
    t.run(progress=False)
    with caplog.at_level("WARNING", logger="flownp.jobs.train"):
        Trainer(store, tmp_path / "run", TINY, cfg(steps=4)).resume(tmp_path / "run" / "last.pt")
    assert not caplog.records  # same store: resumes silently
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    old = "0" * 64  # the checkpoint was trained on another store (e.g. before new years were ingested)
    save_checkpoint(tmp_path / "run" / "last.pt", {**ck, "store_manifest_sha256": old})
    resumed = Trainer(store, tmp_path / "run", TINY, cfg(steps=4))
    with caplog.at_level("WARNING", logger="flownp.jobs.train"):
        resumed.resume(tmp_path / "run" / "last.pt")  # a warning, not a refusal
    assert resumed.step == 2
    [rec] = caplog.records
    assert rec.levelname == "WARNING" and "changed store" in rec.message
    assert old in rec.message and store.manifest_sha256 in rec.message
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["checkpoint_store_manifest_sha256"] == old
    assert rows[-1]["store_manifest_sha256"] == store.manifest_sha256
    # a changed normaliser (new train years moved the statistics) is refused: the weights live in its units
    other = {**ck["normalizer"], "mean": [m + 1.0 for m in ck["normalizer"]["mean"]]}
    save_checkpoint(tmp_path / "run" / "last.pt", {**ck, "normalizer": other})
    with pytest.raises(ValueError, match="normaliser changed"):
        Trainer(store, tmp_path / "run", TINY, cfg(steps=4)).resume(tmp_path / "run" / "last.pt")


def test_python_m_cli_pretrain_is_the_pretrain_command(monkeypatch, tmp_path):
    """`python -m flownp.jobs.cli pretrain` (what torchrun runs) parses the same options as `flownp pretrain`
    and passes them to pretraining."""
    import os
    import subprocess
    import sys

    import typer

    import flownp.jobs.train as train
    from flownp.jobs.cli import app

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    r = subprocess.run([sys.executable, "-m", "flownp.jobs.cli", "pretrain", "--help"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for opt in ("--data", "--out", "--steps", "--max-minutes", "--resume"):
        assert opt in r.stdout, opt
    seen = {}
    monkeypatch.setattr(train, "pretrain", lambda data, out, mcfg, tcfg, **kw: seen.update(
        data=data, out=out, mcfg=mcfg, tcfg=tcfg, **kw) or {})
    cmd = typer.main.get_command(app).commands["pretrain"]  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as exit_:
        cmd.main(args=["--data", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--steps", "7", "--d-model", "8",
                       "--max-minutes", "1.5", "--resume", "--quiet"], prog_name="flownp pretrain")
    assert exit_.value.code in (0, None)
    assert seen["data"] == tmp_path / "s" and seen["out"] == tmp_path / "r" and seen["tcfg"].steps == 7
    assert seen["mcfg"].d_model == 8 and seen["max_minutes"] == 1.5 and seen["resume"] and not seen["progress"]



@pytest.mark.parametrize("arch", ["cached", "pointwise"])
def test_path_draws_share_the_context_and_average_independent_draws(arch):
    """fm_loss(draws=K) is the mean of K single-draw losses on the same (noise, time) draws, with the context
    encoded once (and, pointwise, the targets' locations passed once) for the K."""
    from flownp.core.model import FlowNP
    from flownp.core.paths import PathSample, flow_matching_loss, scaled_frame
    from flownp.jobs.train import flow_space, fm_loss
    from ingest.tasks import TaskBatch

    torch.manual_seed(0)
    m = FlowNP(ModelConfig(arch=arch, targets="independent", d_model=16, n_heads=2, n_layers=2, d_ff=32,
                           embed_hidden=16, head_hidden=32, value_layers=1 if arch == "pointwise" else 0,
                           velocity="residual")).double()
    for p in m.parameters():  # the residual head starts at zero: make the velocity nonzero
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(1)
    xc, yc, xt, yt = (torch.randn(2, n, d, generator=g, dtype=torch.float64) for n, d in ((9, 2), (9, 4), (5, 2), (5, 4)))
    batch = TaskBatch(xc, yc, xt, yt, torch.zeros(2, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long),
                      torch.zeros(2, 5, dtype=torch.long))
    encode, rows = m.encode_context, []
    m.encode_context = lambda *a: (rows.append(a[0].shape[0]), encode(*a))[1]  # noqa: E731
    if arch == "pointwise":  # the targets' location pass: on the B tasks, not the B * K states
        m.embed_target.register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].shape[0]))
    k3 = fm_loss(m, batch, torch.Generator().manual_seed(5), draws=3)
    assert rows == ([2, 2] if arch == "pointwise" else [2])
    m.encode_context = encode
    # the same draws one at a time: sample_path takes y0 (B, K, n, D), then t (B, K, n) from the generator
    gen = torch.Generator().manual_seed(5)
    y0 = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    t = torch.rand(2, 3, 5, generator=gen, dtype=torch.float64)
    fb = flow_space(m, batch)
    singles = []
    for k in range(3):
        tk = t[:, k, :, None]
        p = scaled_frame(PathSample(t[:, k], tk * fb.yt + (1 - tk) * y0[:, k], fb.yt - y0[:, k]))
        singles.append(flow_matching_loss(m(fb.xc, fb.yc, fb.xt, p.yt, p.t), p))
    torch.testing.assert_close(k3, torch.stack(singles).mean())
    assert not torch.allclose(singles[0], singles[1])  # the draws differ
    with pytest.raises(ValueError, match="path_draws"):
        TrainConfig(path_draws=0)
    with pytest.raises(ValueError, match="scalar or"):  # times on the wrong axis would broadcast silently
        m(fb.xc, fb.yc, fb.xt, y0, t[:, 0, :3])


def test_path_draws_train_and_are_refused_outside_pretraining(tiny_store, tmp_path):
    store = Store.open(tiny_store)
    t = Trainer(store, tmp_path / "k", TINY, cfg(steps=2, path_draws=2))
    t.run(progress=False)
    assert math.isfinite(losses(tmp_path / "k" / "log.jsonl")[2])
    from flownp.jobs.baselines.neural import NeuralBaselineConfig

    with pytest.raises(ValueError, match="pretraining only"):
        Trainer(store, tmp_path / "b", NeuralBaselineConfig(kind="cnp"), cfg(path_draws=2))
    from flownp.jobs.finetune import FinetuneConfig, FineTuner

    with pytest.raises(ValueError, match="pretraining only"):  # fine-tunes and their controls draw K = 1
        FineTuner(store, tmp_path / "f", tmp_path / "k" / "best.pt", FinetuneConfig(), cfg(path_draws=2))
