"""Data-parallel training with PyTorch's own DDP on gloo (CPU): two processes stay in lockstep, draw
different but reproducible task streams, only rank 0 writes, a killed run resumes to the same weights,
and the real `torchrun` launcher runs pretraining and fine-tuning end to end."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flownp.core.config import ModelConfig
from flownp.jobs.train import TrainConfig

TINY = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16, head_hidden=32)
CFG = dict(steps=8, batch_size=2, n_ctx_min=30, n_ctx_max=40, n_tgt=10, warmup=2, ckpt_every=4, log_every=1,
           val_batches=1, seed=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, store: str, out: str, stop_at: int | None, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from flownp.jobs.distributed import init_from_env
    from flownp.jobs.train import Trainer
    from ingest.store import Store

    import flownp.jobs.train as train_mod

    writes: list[str] = []  # every checkpoint this rank wrote
    real_save = train_mod.save_checkpoint
    train_mod.save_checkpoint = lambda path, payload: (writes.append(Path(path).name), real_save(path, payload))[1]
    dist = init_from_env("cpu")
    t = Trainer(Store.open(store), out, TINY, TrainConfig(**CFG), dist)
    if resume:
        t.resume(Path(out) / "last.pt")
    t.run(progress=False, stop_at=stop_at)
    first = t.sampler[0].map_index.tolist()
    torch.save({"params": [p.detach().clone() for p in t.model.parameters()], "first_maps": first,
                "step": t.step, "writes": writes}, Path(out).parent / f"{Path(out).name}-rank{rank}.pt")
    torch.distributed.destroy_process_group()


def launch(store, out: Path, world=2, stop_at=None, resume=False) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(store), str(out), stop_at, resume), nprocs=world, join=True)
    return [torch.load(out.parent / f"{out.name}-rank{r}.pt") for r in range(world)]


def _budget_worker(rank: int, world: int, port: int, store: str, out: str, budgets: list[float]) -> None:
    """One rank of a run where each rank has its own time budget (standing for clocks that disagree)."""
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from flownp.jobs.distributed import init_from_env
    from flownp.jobs.train import Trainer
    from ingest.store import Store

    # a short timeout: a rank left alone in a collective fails the test instead of hanging it
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    t = Trainer(Store.open(store), out, TINY, TrainConfig(**CFG), init_from_env("cpu"))
    last = t.run(progress=False, max_minutes=budgets[rank])
    torch.save({"step": t.step, "stopped_at": last.get("stopped_at")}, Path(out).parent / f"budget-rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_stop_together_when_their_clocks_disagree(tiny_store, tmp_path):
    # rank 1's budget is spent after its first step, rank 0's never: without a collective decision rank 1
    # stops alone and rank 0 waits in DDP's all-reduce of step 2
    out = tmp_path / "run"
    mp.spawn(_budget_worker, args=(2, free_port(), str(tiny_store), str(out), [60.0, 0.0]), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"budget-rank{r}.pt") for r in range(2)]
    assert got[0] == got[1] == {"step": 1, "stopped_at": 1}
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1] == {"step": 1, "stopped": "time budget"}
    from flownp.checkpoint import load_checkpoint

    assert load_checkpoint(out / "last.pt")["step"] == 1  # written for --resume


@pytest.mark.slow
def test_two_gloo_ranks_stay_in_lockstep_and_resume_exactly(tiny_store, tmp_path):
    full = launch(tiny_store, tmp_path / "full")
    for a, b in zip(full[0]["params"], full[1]["params"]):
        assert torch.equal(a, b)  # DDP averaged the gradients: identical weights on both ranks
    assert full[0]["first_maps"] != full[1]["first_maps"]  # each rank draws its own tasks
    again = launch(tiny_store, tmp_path / "again")
    assert again[0]["first_maps"] == full[0]["first_maps"]  # ... reproducibly
    # only rank 0 wrote: rank 1 saved no checkpoint, one log line per logged step, checkpoints present
    assert full[1]["writes"] == [] and "last.pt" in full[0]["writes"], (full[0]["writes"], full[1]["writes"])
    rows = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9))
    assert (tmp_path / "full" / "last.pt").exists() and not list((tmp_path / "full").glob("*.part"))
    # killed after step 6 (last checkpoint at 4), relaunched: ends where the uninterrupted run ended
    launch(tiny_store, tmp_path / "part", stop_at=6)
    resumed = launch(tiny_store, tmp_path / "part", resume=True)
    assert resumed[0]["step"] == 8
    for a, b in zip(full[0]["params"], resumed[0]["params"]):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun launcher not installed beside this Python")
def test_torchrun_runs_pretraining_and_finetuning(tiny_store, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--batch-size", "2", "--n-ctx", "30-40", "--n-tgt", "10", "--warmup", "1", "--quiet"]
    run = lambda *a: subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "flownp.jobs.cli", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    pre = run("pretrain", "--data", str(tiny_store), "--out", str(tmp_path / "pre"), "--steps", "4",
              "--d-model", "16", "--n-layers", "1", "--ckpt-every", "4", *common)
    assert pre.returncode == 0, pre.stderr[-2000:]
    ft = run("finetune", "--from", str(tmp_path / "pre" / "last.pt"), "--data", str(tiny_store), "--out",
             str(tmp_path / "ft"), "--steps", "2", "--k-steps", "2", "--inversion-steps", "2", "--ckpt-every", "2",
             *common)
    assert ft.returncode == 0, ft.stderr[-2000:]
    assert (tmp_path / "ft" / "last.pt").exists()
    rows = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2]  # rank 0 alone logged (every 10 steps and the last)
