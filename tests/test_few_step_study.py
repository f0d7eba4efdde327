"""bench/few_step_study.py end to end on tiny models: it trains the LFM and the distilled maps from a tiny
GP-base global flow, and scores every sampler on the same noise and per-task transforms (the global flow's
Euler-K at the reference solve scores a ratio of exactly 1), with the oracle on a synthetic GP-law set."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_few_step_study_trains_the_competitors_and_scores_them_on_shared_noise(tiny_store, tmp_path):
    from flownp.core.config import ModelConfig
    from flownp.jobs.train import TrainConfig, pretrain
    from ingest.store import Store
    from ingest.tasks import make_eval_set, save_eval_set

    mc = ModelConfig(targets="independent", d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16,
                     head_hidden=32, standardise="context", base="gp", velocity="residual", activation="silu",
                     gp_fit_points=64)
    pretrain(tiny_store, tmp_path / "global", mc, TrainConfig(steps=4, batch_size=2, n_ctx_min=40, n_ctx_max=60,
                                                               n_tgt=16, warmup=1, ckpt_every=2, val_batches=1),
             progress=False)
    store = Store.open(tiny_store)
    times, _ = store.load("test")
    save_eval_set(make_eval_set(times, store.region.n_points, split="test", n_tasks=2, n_ctx_min=40, n_ctx_max=60,
                                n_tgt=24, seed=3), tmp_path / "ev")
    spec = importlib.util.spec_from_file_location("few_step_study", REPO / "bench" / "few_step_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = mod.main(["--global", str(tmp_path / "global" / "best.pt"), "--data", str(tiny_store), "--work",
                    str(tmp_path / "work"), "--blocks", "2", "--groups", "1,2", "--distill-steps", "2",
                    "--syn-store", str(tiny_store), "--syn-sets", str(tmp_path / "ev"), "--tasks", "2",
                    "--samples", "3", "--nfe", "1,2", "--reference", "euler:2", "--ll-nfe", "4",
                    "--real-file", str(tmp_path / "absent.nc"), "--json", str(tmp_path / "out.json")])
    (res,) = out["sets"].values()
    rows = res["rows"]
    assert set(rows) == {"global flow, Euler-K", "LFM (2 blocks), Euler per block", "distilled global flow",
                         "distilled LFM"}
    assert rows["global flow, Euler-K"]["2"]["crps_ratio"] == 1.0  # the reference solve itself, same noise
    assert set(rows["distilled LFM"]) == {"1", "2"} and set(rows["LFM (2 blocks), Euler per block"]) == {"2"}
    for r in rows.values():
        for m in r.values():
            assert 0 <= m["cov90"]["t2m"] <= 1 and m["crps"]["t2m"] > 0
    ll = res["tar_ll"]
    assert all(math.isfinite(ll[k]) for k in ("global flow", "LFM", "oracle"))
    assert ll["oracle"] > ll["global flow"]  # the exact law beats a 4-step model (same units)
    assert (tmp_path / "out.json").exists() and (tmp_path / "work" / "lfm" / "best.pt").exists()
