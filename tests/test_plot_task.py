"""`flownp evaluate --plot --plot-task N`: the plot shows task N of the evaluation set (not whatever task
leads the first batch), and an index outside the set is a clear usage error raised before any work."""

import numpy as np
import pytest
from typer.testing import CliRunner

import flownp.jobs.evaluate as evaluate
from flownp.jobs.cli import app
from flownp.core.config import ModelConfig
from flownp.jobs.train import TrainConfig, Trainer
from ingest.store import Store
from ingest.tasks import load_eval_set, make_eval_set, save_eval_set

TINY = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16, head_hidden=32)


@pytest.fixture(scope="module")
def setup(tiny_store, tmp_path_factory):
    """A one-step checkpoint and a frozen 4-task test set whose tasks have different context sizes."""
    root = tmp_path_factory.mktemp("plot_task")
    store = Store.open(tiny_store)
    cfg = TrainConfig(steps=1, batch_size=2, n_ctx_min=40, n_ctx_max=60, n_tgt=20, warmup=1, ckpt_every=1,
                      log_every=1, val_batches=1, seed=0)
    Trainer(store, root / "run", TINY, cfg).run(progress=False)
    times, _ = store.load("test", normalized=False)
    es = make_eval_set(times, store.region.n_points, split="test", n_tasks=4, n_ctx_min=30, n_ctx_max=60,
                       n_tgt=20, seed=0, extra={"store_manifest_sha256": store.manifest_sha256})
    save_eval_set(es, root / "es")
    return root / "run" / "last.pt", root / "es"


def cli_args(tiny_store, ckpt, es_dir, png):
    return ["evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_store), "--eval-set", str(es_dir),
            "--batch-size", "4", "--samples", "0", "--ll-solver", "euler:1", "--sample-solver", "euler:1",
            "--plot", str(png), "--quiet", "--json"]


@pytest.mark.parametrize("index", ["4", "-1"])
def test_out_of_range_plot_task_is_a_usage_error_before_any_work(tiny_store, setup, tmp_path, monkeypatch, index):
    ckpt, es_dir = setup

    def no_work(*a, **k):
        raise AssertionError("evaluated before refusing the plot task")

    monkeypatch.setattr(evaluate, "evaluate_predictor", no_work)
    r = CliRunner().invoke(app, cli_args(tiny_store, ckpt, es_dir, tmp_path / "p.png") + ["--plot-task", index])
    assert r.exit_code == 2, r.output
    assert f"--plot-task {index} is out of range" in r.output and "holds 4 tasks" in r.output
    assert not (tmp_path / "p.png").exists()
    # --plot-task without --plot would be silently ignored: refused too
    args = [a for a in cli_args(tiny_store, ckpt, es_dir, tmp_path / "p.png") if a not in ("--plot",
                                                                                          str(tmp_path / "p.png"))]
    r = CliRunner().invoke(app, args + ["--plot-task", "1"])
    assert r.exit_code == 2 and "give --plot" in r.output


def test_plot_task_draws_that_task_of_the_set(tiny_store, setup, tmp_path, monkeypatch):
    ckpt, es_dir = setup
    es = load_eval_set(es_dir)
    store = Store.open(tiny_store)
    times, values = store.load("test")
    first = next(es.batches(values, store.region.circle_xy, times, 4))  # what the old code plotted
    # neither the default task 0 nor the task leading the first batch (the batches are grouped by context size)
    n = next(i for i in range(1, len(es)) if es.map_index(times)[i] != int(first.map_index[0]))
    seen = {}
    real = evaluate.plot_task
    monkeypatch.setattr(evaluate, "plot_task", lambda model, batch, *a, **k: (seen.update(batch=batch, **k),
                                                                              real(model, batch, *a, **k)))
    png = tmp_path / "p.png"
    r = CliRunner().invoke(app, cli_args(tiny_store, ckpt, es_dir, png) + ["--plot-task", str(n)])
    assert r.exit_code == 0, r.output
    b = seen["batch"]
    assert b.xc.shape[0] == 1 and int(b.map_index[0]) == es.map_index(times)[n]
    assert np.array_equal(b.ctx_index[0].numpy(), es.perm[n][:es.n_ctx[n]])
    assert np.array_equal(b.tgt_index[0].numpy(), es.perm[n][es.n_ctx[n]:es.n_ctx[n] + 20])
    assert f"task {n} of the evaluation set" in seen["label"]
    assert png.stat().st_size > 10_000
    assert f'"index": {n}' in r.output and str(es.times[n]) in r.output
