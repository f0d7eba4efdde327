"""Context/target tasks (docs/protocol.md §5) and frozen evaluation sets.

For each map: a random permutation of the P circle points; context = the first n_ctx, targets = the
rest (or the first n_tgt of the rest); all four variables in both. Every task of a batch shares n_ctx
(drawn once per batch, as the public FlowNP code does): no padding or masks, every batch is a dense
tensor, and the joint likelihood of a task never depends on padding. Everything is a pure function of
(seed, rank, epoch, batch index), so runs, resumes and ranks are reproducible.

Tensors (model space): xc (B, n_ctx, 2) and xt (B, n_tgt, 2) model coordinates (lon, lat);
yc (B, n_ctx, 4) and yt (B, n_tgt, 4) normalised values in model order (sp, t2m, u10, v10).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ingest.io import atomic_path, sha256_file, write_json_atomic


@dataclass(frozen=True)
class TaskConfig:
    """n_ctx is drawn uniformly in [n_ctx_min, n_ctx_max] (inclusive) once per batch; n_tgt = None
    means all the remaining points are targets."""

    n_ctx_min: int = 2
    n_ctx_max: int = 1199
    n_tgt: int | None = None
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_ctx_min <= self.n_ctx_max:
            raise ValueError(f"need 1 <= n_ctx_min <= n_ctx_max, got {self.n_ctx_min}, {self.n_ctx_max}")
        if self.n_tgt is not None and self.n_tgt < 1:
            raise ValueError("n_tgt must be >= 1 or None")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def check(self, n_points: int) -> None:
        """Raise if the setting cannot be met with `n_points` points per map."""
        need = self.n_ctx_max + (self.n_tgt or 1)
        if need > n_points:
            raise ValueError(f"n_ctx_max {self.n_ctx_max} + targets {self.n_tgt or 1} > {n_points} points")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskConfig":
        return cls(**d)


@dataclass
class TaskBatch:
    """One batch of tasks sharing n_ctx (see module docstring for shapes)."""

    xc: torch.Tensor
    yc: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor
    map_index: torch.Tensor  # (B,) index into the split's maps
    ctx_index: torch.Tensor  # (B, n_ctx) circle point indices
    tgt_index: torch.Tensor  # (B, n_tgt) circle point indices

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def gather_tasks(values: np.ndarray, xy: np.ndarray, map_index: np.ndarray, perm: np.ndarray,
                 n_ctx: int, n_tgt: int | None) -> TaskBatch:
    """Tasks from maps `values` (M, P, 4), coordinates `xy` (P, 2), `perm` (B, P) point permutations."""
    n_tgt = perm.shape[1] - n_ctx if n_tgt is None else n_tgt
    ci, ti = perm[:, :n_ctx], perm[:, n_ctx:n_ctx + n_tgt]
    maps = values[map_index]  # (B, P, 4)
    take = lambda idx: np.take_along_axis(maps, idx[..., None], axis=1)  # noqa: E731
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return TaskBatch(
        xc=f32(xy[ci]), yc=f32(take(ci)), xt=f32(xy[ti]), yt=f32(take(ti)),
        map_index=torch.from_numpy(map_index.astype(np.int64)),
        ctx_index=torch.from_numpy(ci.astype(np.int64)), tgt_index=torch.from_numpy(ti.astype(np.int64)),
    )


def _permutations(rng: np.random.Generator, batch: int, n_points: int) -> np.ndarray:
    return np.argsort(rng.random((batch, n_points)), axis=1)


class TaskSampler(Dataset):
    """A map-style dataset whose item i is batch i of the current epoch (use DataLoader(batch_size=None)).

    Each epoch visits a seeded permutation of the maps shared by all ranks; rank r of `world` takes
    batches r, r + world, ... of it, so ranks see disjoint maps and draw their own task streams.
    """

    def __init__(self, values: np.ndarray, xy: np.ndarray, config: TaskConfig, *, rank: int = 0,
                 world: int = 1, epoch: int = 0) -> None:
        if values.ndim != 3 or values.shape[2] != 4 or xy.shape != (values.shape[1], 2):
            raise ValueError(f"values must be (M, P, 4) and xy (P, 2); got {values.shape}, {xy.shape}")
        if values.shape[0] < 1:
            raise ValueError("no maps to draw tasks from")
        config.check(values.shape[1])
        self.values, self.xy, self.config = values, np.asarray(xy, np.float64), config
        self.rank, self.world = rank, world
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.values))

    def __len__(self) -> int:
        total = -(-len(self.values) // self.config.batch_size)
        return max(1, total // self.world)

    def __getitem__(self, i: int) -> TaskBatch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        c = self.config
        j = i * self.world + self.rank
        idx = self._order[(np.arange(c.batch_size) + j * c.batch_size) % len(self.values)]
        rng = np.random.default_rng([c.seed, self.epoch, j, 1])
        n_ctx = int(rng.integers(c.n_ctx_min, c.n_ctx_max + 1))
        perm = _permutations(rng, c.batch_size, self.values.shape[1])
        return gather_tasks(self.values, self.xy, idx, perm, n_ctx, c.n_tgt)


# ---- frozen evaluation sets --------------------------------------------------------------------

@dataclass
class EvalSet:
    """A frozen list of tasks: which map (by time), n_ctx, and the point permutation of each."""

    times: np.ndarray      # (N,) datetime64[s] of each task's map
    n_ctx: np.ndarray      # (N,) int
    perm: np.ndarray       # (N, P) int16 permutation of circle points
    meta: dict[str, Any]   # split, seed, n_ctx range, n_tgt, store manifest hash, ...

    def __len__(self) -> int:
        return len(self.times)

    def map_index(self, store_times: np.ndarray) -> np.ndarray:
        """Indices of this set's maps in `store_times` (the split's times). Raises if any is missing."""
        st = store_times.astype("datetime64[s]")
        pos = np.searchsorted(st, self.times)
        ok = (pos < len(st)) & (st[np.minimum(pos, len(st) - 1)] == self.times)
        if not ok.all():
            raise ValueError(f"{int((~ok).sum())} evaluation map(s) are not in the store split")
        return pos

    def batches(self, values: np.ndarray, xy: np.ndarray, store_times: np.ndarray,
                batch_size: int) -> Iterator[TaskBatch]:
        """Batches of tasks sharing n_ctx, in a fixed order (grouped by n_ctx, then set order)."""
        idx = self.map_index(store_times)
        n_tgt = self.meta.get("n_tgt")
        for n in np.unique(self.n_ctx):
            sel = np.flatnonzero(self.n_ctx == n)
            for a in range(0, len(sel), batch_size):
                s = sel[a:a + batch_size]
                yield gather_tasks(values, xy, idx[s], self.perm[s].astype(np.int64), int(n), n_tgt)


def make_eval_set(store_times: np.ndarray, n_points: int, *, split: str, n_tasks: int | None,
                  n_ctx_min: int, n_ctx_max: int, n_tgt: int | None = None, seed: int = 0,
                  extra: dict[str, Any] | None = None) -> EvalSet:
    """Draw a frozen evaluation set: `n_tasks` maps (None = every map of the split, in time order;
    else a seeded sample without replacement), n_ctx uniform in [min, max] per task."""
    TaskConfig(n_ctx_min, n_ctx_max, n_tgt).check(n_points)
    rng = np.random.default_rng([seed, 2])
    m = len(store_times)
    if m == 0:
        raise ValueError(f"split {split!r} holds no maps")
    if n_tasks is None:
        pick = np.arange(m)
    else:
        if not 1 <= n_tasks <= m:
            raise ValueError(f"n_tasks must be in 1..{m} for split {split!r}, got {n_tasks}")
        pick = np.sort(rng.choice(m, size=n_tasks, replace=False))
    n = rng.integers(n_ctx_min, n_ctx_max + 1, size=len(pick))
    perm = _permutations(rng, len(pick), n_points).astype(np.int16)
    meta = {"split": split, "n_tasks": int(len(pick)), "n_ctx_min": n_ctx_min, "n_ctx_max": n_ctx_max,
            "n_tgt": n_tgt, "seed": seed, "n_points": n_points, **(extra or {})}
    return EvalSet(store_times[pick].astype("datetime64[s]"), n.astype(np.int64), perm, meta)


def save_eval_set(es: EvalSet, out_dir: str | Path) -> Path:
    """Write `tasks.npz` and `manifest.json` (with the npz's sha256) into `out_dir`."""
    out = Path(out_dir)
    with atomic_path(out / "tasks.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, times=es.times.astype(np.int64), n_ctx=es.n_ctx, perm=es.perm)
    manifest = {"kind": "flownp-weather-eval-set", **es.meta,
                "time_start": str(es.times.min()), "time_end": str(es.times.max()),
                "tasks_npz_sha256": sha256_file(out / "tasks.npz")}
    write_json_atomic(out / "manifest.json", manifest)
    return out


def load_eval_set(path: str | Path) -> EvalSet:
    """Read a saved evaluation set, checking its sha256."""
    path = Path(path)
    meta = json.loads((path / "manifest.json").read_text())
    if sha256_file(path / "tasks.npz") != meta["tasks_npz_sha256"]:
        raise ValueError(f"{path}: tasks.npz does not match its manifest's sha256")
    with np.load(path / "tasks.npz") as z:
        es = EvalSet(z["times"].astype("datetime64[s]"), z["n_ctx"], z["perm"], {})
    es.meta = {k: v for k, v in meta.items() if k not in ("kind", "tasks_npz_sha256", "time_start", "time_end")}
    return es
