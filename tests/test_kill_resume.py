"""A real kill: `flownp pretrain` run as its own process is SIGKILLed mid-way (checkpoints behind it),
rerun with --resume, and ends with exactly the weights, EMA and optimiser state of an uninterrupted run of
the same command. Checkpoints are written atomically (temporary name, fsync, rename), so a kill leaves at
most a `.NAME.PID.part` file, which a resume never reads."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flownp.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200  # checkpoints every 5 steps; the kill comes after step KILL_AFTER, well before the end
KILL_AFTER = 80
PART = re.compile(r"\.(last|best)\.pt\.(\d+)\.part")


def command(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flownp.jobs.cli", "pretrain", "--data", str(store), "--out", str(out),
            "--steps", str(STEPS), "--batch-size", "2", "--n-ctx", "40-60", "--n-tgt", "20", "--d-model", "16",
            "--n-layers", "1", "--warmup", "2", "--ckpt-every", "5", "--seed", "3", "--quiet", *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as f:  # a file, not a pipe: a full pipe could block the child
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def validated(log: Path) -> int:
    """The last step whose validation the run has logged (0: none yet); a half-written line is skipped."""
    last = 0
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "val_loss_ema" in rec:
                last = max(last, rec["step"])
    return last


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.slow
def test_sigkilled_pretrain_resumes_to_the_uninterrupted_result(tiny_store, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    procs: list[subprocess.Popen] = []
    try:
        # the uninterrupted run, alongside (separate processes: the result must not depend on it)
        procs.append(start(command(tiny_store, full), tmp_path / "full.out"))
        victim = start(command(tiny_store, part), tmp_path / "part.out")
        procs.append(victim)
        # kill once validation at step >= KILL_AFTER is logged: last.pt (written after each validation) then
        # holds step >= KILL_AFTER - 5, past the first epoch (72 batches), so the resume also has to restore
        # the task stream's epoch
        deadline = time.monotonic() + 120
        while validated(part / "log.jsonl") < KILL_AFTER:
            assert victim.poll() is None, f"exited ({victim.returncode}) before step {KILL_AFTER}:\n" \
                                          f"{tail(tmp_path / 'part.out')}"
            assert time.monotonic() < deadline, f"step {KILL_AFTER} not reached within 120 s"
            time.sleep(0.01)
        assert victim.poll() is None, "finished before it could be killed: raise STEPS"
        os.kill(victim.pid, signal.SIGKILL)  # a real kill: no handler, no finally, no flush
        assert victim.wait(timeout=30) == -signal.SIGKILL

        # what the kill left: complete checkpoints under their own names, at most temporary .part files
        names = sorted(p.name for p in part.iterdir())
        for name in names:
            m = PART.fullmatch(name)
            assert name in ("log.jsonl", "last.pt", "best.pt") or (m and int(m.group(2)) == victim.pid), names
        killed_at = int(load_checkpoint(part / "last.pt")["step"])  # loads: it is complete
        assert KILL_AFTER - 5 <= killed_at < STEPS and killed_at % 5 == 0, killed_at
        if (part / "best.pt").exists():
            load_checkpoint(part / "best.pt")
        # a kill in the middle of a write leaves a truncated temporary file: make sure there is one, so the
        # resume below always shows that it is ignored (it reads OUT/last.pt only)
        data = (part / "last.pt").read_bytes()
        (part / f".last.pt.{victim.pid}.part").write_bytes(data[: len(data) // 2])

        r = subprocess.run(command(tiny_store, part, "--resume"), capture_output=True, text=True, timeout=180,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == STEPS
        ref = procs[0]
        assert ref.wait(timeout=180) == 0, tail(tmp_path / "full.out")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    # the dead writer's temporary file was cleaned up by the next save
    assert not [p.name for p in part.iterdir() if p.name.endswith(".part")], sorted(p.name for p in part.iterdir())
    # the rerun continued from the checkpoint, not from scratch: the validations up to it are logged once
    recs = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    vals = [r["step"] for r in recs if "val_loss_ema" in r and r["step"] <= killed_at]
    assert vals == list(range(5, killed_at + 1, 5)), vals
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(part / "last.pt")
    assert a["step"] == b["step"] == STEPS
    assert_same_state(a["model"], b["model"], "model")  # bitwise equal, not close
    assert_same_state(a["ema"], b["ema"], "ema")
    for (ka, sa), (kb, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert ka == kb
        assert_same_state(sa, sb, f"optimizer state {ka}")
    assert a["best_val"] == b["best_val"]
    best_a, best_b = load_checkpoint(full / "best.pt"), load_checkpoint(part / "best.pt")
    assert best_a["step"] == best_b["step"]
    assert_same_state(best_a["ema"], best_b["ema"], "best.pt ema")
