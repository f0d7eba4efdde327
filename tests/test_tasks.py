import numpy as np
import pytest
import torch

from ingest.region import MEMPHIS
from ingest.tasks import TaskConfig, TaskSampler, load_eval_set, make_eval_set, save_eval_set


@pytest.fixture()
def maps():
    # value at each point encodes (map, point) so gathered tasks can be checked exactly
    m, p = 20, MEMPHIS.n_points
    v = np.zeros((m, p, 4), np.float32)
    v[..., 0] = np.arange(m)[:, None]
    v[..., 1] = np.arange(p)[None, :]
    return v


def test_tasks_are_consistent_partitions(maps):
    ts = TaskSampler(maps, MEMPHIS.circle_xy, TaskConfig(100, 200, batch_size=4, seed=3))
    b = ts[1]
    nc = b.xc.shape[1]
    assert 100 <= nc <= 200 and b.xt.shape[1] == MEMPHIS.n_points - nc
    for k in range(4):
        ci, ti = b.ctx_index[k].numpy(), b.tgt_index[k].numpy()
        assert len(set(ci) | set(ti)) == MEMPHIS.n_points and not set(ci) & set(ti)
        assert np.all(b.yc[k, :, 0].numpy() == b.map_index[k].item())
        assert np.array_equal(b.yc[k, :, 1].numpy(), ci) and np.array_equal(b.yt[k, :, 1].numpy(), ti)
        np.testing.assert_array_equal(b.xt[k].numpy(), MEMPHIS.circle_xy[ti].astype(np.float32))


def test_tasks_are_deterministic_and_epochs_differ(maps):
    cfg = TaskConfig(2, 1199, batch_size=4, seed=7)
    a, b = TaskSampler(maps, MEMPHIS.circle_xy, cfg), TaskSampler(maps, MEMPHIS.circle_xy, cfg)
    assert torch.equal(a[2].yt, b[2].yt) and torch.equal(a[2].ctx_index, b[2].ctx_index)
    b.set_epoch(1)
    assert not torch.equal(a[2].ctx_index, b[2].ctx_index)


def test_ranks_see_disjoint_maps_in_an_epoch(maps):
    cfg = TaskConfig(10, 20, batch_size=2, seed=1)
    r0 = TaskSampler(maps, MEMPHIS.circle_xy, cfg, rank=0, world=2)
    r1 = TaskSampler(maps, MEMPHIS.circle_xy, cfg, rank=1, world=2)
    seen0 = {int(i) for k in range(len(r0)) for i in r0[k].map_index}
    seen1 = {int(i) for k in range(len(r1)) for i in r1[k].map_index}
    assert not seen0 & seen1 and len(seen0 | seen1) == 20


def test_fixed_target_count_and_bad_settings(maps):
    b = TaskSampler(maps, MEMPHIS.circle_xy, TaskConfig(50, 50, n_tgt=30, batch_size=2))[0]
    assert b.xc.shape == (2, 50, 2) and b.xt.shape == (2, 30, 2)
    with pytest.raises(ValueError, match="n_ctx_min"):
        TaskConfig(0, 10)
    with pytest.raises(ValueError, match="points"):
        TaskSampler(maps, MEMPHIS.circle_xy, TaskConfig(10, 1245))


def test_eval_set_round_trip_and_tamper_detection(maps, tmp_path):
    times = np.arange("1989-01-01T00", "1989-01-01T20", dtype="datetime64[h]").astype("datetime64[ns]")
    es = make_eval_set(times, MEMPHIS.n_points, split="test", n_tasks=7, n_ctx_min=950, n_ctx_max=1000,
                       seed=5)
    save_eval_set(es, tmp_path / "ev")
    back = load_eval_set(tmp_path / "ev")
    assert np.array_equal(back.times, es.times) and np.array_equal(back.perm, es.perm)
    assert back.meta["seed"] == 5 and back.meta["split"] == "test"
    batches = list(back.batches(maps, MEMPHIS.circle_xy, times, batch_size=3))
    assert sum(len(b.map_index) for b in batches) == 7
    for b in batches:  # tasks name their maps by time, so the gathered values are those maps
        assert np.all(np.isin(b.map_index.numpy(), back.map_index(times)))
    # the same seed gives the same set; another seed another one
    again = make_eval_set(times, MEMPHIS.n_points, split="test", n_tasks=7, n_ctx_min=950, n_ctx_max=1000, seed=5)
    assert np.array_equal(again.perm, es.perm)
    (tmp_path / "ev" / "tasks.npz").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        load_eval_set(tmp_path / "ev")
    with pytest.raises(ValueError, match="not in the store"):
        es.map_index(times[:3])
