"""The analysis notebook runs end to end on a tiny setup (two tiny checkpoints, a frozen set of four
tasks) and prints the FlowNP vs FT-FlowNP comparison table; the xarray API keeps units and coordinates."""

from pathlib import Path

import numpy as np
import pytest

from flownp.api import Extrapolator
from flownp.jobs.finetune import FinetuneConfig, FineTuner
from flownp.jobs.train import TrainConfig, Trainer
from flownp.core.config import ModelConfig
from ingest.store import Store
from ingest.tasks import make_eval_set, save_eval_set
from ingest.variables import BY_NAME, NAMES

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"
TINY = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16, head_hidden=32)


@pytest.fixture(scope="module")
def setup(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    store = Store.open(tiny_store)
    c = dict(batch_size=4, n_ctx_min=80, n_ctx_max=80, n_tgt=30, warmup=2, log_every=10, val_batches=1, lr=2e-3)
    Trainer(store, root / "base", TINY, TrainConfig(steps=20, ckpt_every=20, **c)).run(progress=False)
    FineTuner(store, root / "ft", root / "base" / "last.pt", FinetuneConfig(k_steps=2, inversion_steps=4),
              TrainConfig(steps=2, ckpt_every=2, schedule="constant", **c)).run(progress=False)
    times, _ = store.load("test", normalized=False)
    save_eval_set(make_eval_set(times, store.region.n_points, split="test", n_tasks=4, n_ctx_min=80, n_ctx_max=80,
                                n_tgt=30, seed=0), root / "evalset")
    return {"store": tiny_store, "base": root / "base" / "last.pt", "ft": root / "ft" / "last.pt",
            "evalset": root / "evalset"}


def test_api_round_trips_units_and_coordinates(setup):
    ex = Extrapolator.from_checkpoint(setup["base"])
    store = Store.open(setup["store"])
    _, phys = store.load("test", normalized=False)
    era5 = np.stack([BY_NAME[n].model_to_era5(phys[0][:, j]) for j, n in enumerate(NAMES)], -1)
    idx = np.arange(0, 1245, 15)
    ctx = ex.circle_dataset(era5[idx], idx)
    assert ctx.t2m.attrs["units"] == "K" and float(ctx.sp.mean()) > 9e4  # ERA5 units at the edge
    y = ex._values(ctx).numpy()
    np.testing.assert_allclose(ex._to_era5(y), era5[idx], rtol=1e-5)
    out = ex.extrapolate(ctx, "circle", num_samples=2, solver="euler:2", ll_solver="midpoint:2")
    assert out.sizes == {"sample": 2, "point": 1245 - len(idx)}
    assert not set(zip(out.latitude.values.round(4), out.longitude.values.round(4))) & \
        set(zip(ctx.latitude.values.round(4), ctx.longitude.values.round(4)))
    assert out.log_likelihood.attrs["units"] == "nats" and np.isfinite(out.log_likelihood).all()
    with pytest.raises(ValueError, match="0..360"):
        ex.extrapolate(ctx.assign_coords(longitude=ctx.longitude + 360), "circle")
    with pytest.raises(ValueError, match="t2m"):
        ex.extrapolate(ctx.assign(t2m=ctx.t2m - 273.15 - 300), "circle")  # a temperature far below physical
    with pytest.raises(ValueError, match="outside"):
        ex.extrapolate(ctx.assign_coords(latitude=ctx.latitude + 20), "circle")


@pytest.mark.slow
def test_notebook_executes_and_prints_the_comparison(setup, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in {"FLOWNP_NB_STORE": setup["store"], "FLOWNP_NB_EVAL_SET": setup["evalset"],
                 "FLOWNP_NB_BASE": setup["base"], "FLOWNP_NB_FT": setup["ft"], "FLOWNP_NB_SAMPLES": "4",
                 "FLOWNP_NB_LL_SOLVER": "midpoint:4", "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(k, str(v))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "COMPARISON TABLE" in text and "FT-FlowNP" in text and "oracle" in text
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
