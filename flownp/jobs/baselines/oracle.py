"""Exact conditional laws of synthetic weather: the best any model can score.

`OraclePredictor`: one `GPWeather` law for every map (the fixed synthetic winter).
`PriorOraclePredictor`: the broad prior of `ingest.prior`, one law per map, found from the map's
valid time (batch.map_index indexes `times`, the split's times in store order, i.e. the times
`Store.load(split)` returns). It is exact GIVEN each map's drawn parameters (front included), which
a model never sees, so it is an upper bound on the achievable score, not the Bayes predictive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ingest.normalize import Normalizer
from ingest.synthetic import GPWeather
from ingest.tasks import TaskBatch


@dataclass
class OraclePredictor:
    gp: GPWeather
    normalizer: Normalizer
    name: str = "GP oracle"
    ll_kind: str = "joint"

    def _phys(self, y: torch.Tensor) -> np.ndarray:
        return self.normalizer.denormalize(y.double().numpy())

    def law(self, batch: TaskBatch, i: int) -> GPWeather:
        """The law of task i's map (the same for every map here)."""
        return self.gp

    def log_likelihood(self, batch: TaskBatch) -> torch.Tensor:
        out = [self.law(batch, i).oracle_log_likelihood(
                   batch.ctx_index[i].numpy(), self._phys(batch.yc[i]), batch.tgt_index[i].numpy(),
                   self._phys(batch.yt[i]), self.normalizer).joint
               for i in range(batch.xt.shape[0])]
        return torch.tensor(np.array(out, dtype=np.float64))

    def sample(self, batch: TaskBatch, n: int, generator: torch.Generator) -> torch.Tensor:
        res = []
        for i in range(batch.xt.shape[0]):
            m, cov = self.law(batch, i).conditional(batch.ctx_index[i].numpy(), self._phys(batch.yc[i]),
                                                    batch.tgt_index[i].numpy())
            chol = np.linalg.cholesky(cov + 1e-12 * np.eye(len(cov)))
            z = torch.randn((len(cov), n), generator=generator, dtype=torch.float64).numpy()
            s = (m.reshape(-1)[:, None] + chol @ z).T.reshape(n, -1, 4)
            res.append(self.normalizer.normalize(s))
        return torch.tensor(np.array(res), dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ll_kind": self.ll_kind, "estimator": "exact (Gaussian conditioning)"}


@dataclass
class PriorOraclePredictor(OraclePredictor):
    """Per-map exact laws of a broad-prior store. `times` (M,): the valid times of the split's maps
    in the order batch.map_index refers to; `seed`: the `synthesize_broad` seed. `gp` is unused."""

    gp: Any = None
    normalizer: Normalizer = None  # type: ignore[assignment]
    prior: Any = None              # ingest.prior.BroadWeatherPrior
    seed: int = 0
    times: np.ndarray = field(default_factory=lambda: np.zeros(0, "datetime64[ns]"))
    name: str = "broad-prior oracle (given each map's parameters)"
    cache_size: int = 4
    _cache: dict[int, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_law(cls, law: dict[str, Any], times: np.ndarray, normalizer: Normalizer) -> "PriorOraclePredictor":
        """From a store manifest's `synthetic` entry (kind "broad_prior") and the split's times."""
        from ingest.prior import prior_from_law

        prior, seed = prior_from_law(law)
        return cls(normalizer=normalizer, prior=prior, seed=seed, times=np.asarray(times))

    @classmethod
    def from_store(cls, store: Any, split: str, normalizer: Normalizer | None = None) -> "PriorOraclePredictor":
        """For the tasks of `split` of a store built from `synthesize --law broad` files."""
        law = store.manifest.get("synthetic") or {}
        times, _ = store.load(split, normalized=False)
        return cls.from_law(law, times, normalizer or store.normalizer)

    def law(self, batch: TaskBatch, i: int) -> GPWeather:
        k = int(batch.map_index[i])
        if k not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = self.prior.law(self.prior.params_at(self.seed, self.times[k]))
        return self._cache[k]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "law": "broad_prior", "seed": self.seed,
                "note": "exact given each map's drawn parameters (upper bound on any model)"}
