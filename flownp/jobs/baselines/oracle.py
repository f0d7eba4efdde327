"""The exact conditional law of the synthetic GP weather: the best any model can score."""

from __future__ import annotations

from dataclasses import dataclass
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

    def log_likelihood(self, batch: TaskBatch) -> torch.Tensor:
        out = [self.gp.oracle_log_likelihood(batch.ctx_index[i].numpy(), self._phys(batch.yc[i]),
                                             batch.tgt_index[i].numpy(), self._phys(batch.yt[i]),
                                             self.normalizer).joint
               for i in range(batch.xt.shape[0])]
        return torch.tensor(np.array(out, dtype=np.float64))

    def sample(self, batch: TaskBatch, n: int, generator: torch.Generator) -> torch.Tensor:
        res = []
        for i in range(batch.xt.shape[0]):
            m, cov = self.gp.conditional(batch.ctx_index[i].numpy(), self._phys(batch.yc[i]),
                                         batch.tgt_index[i].numpy())
            chol = np.linalg.cholesky(cov + 1e-12 * np.eye(len(cov)))
            z = torch.randn((len(cov), n), generator=generator, dtype=torch.float64).numpy()
            s = (m.reshape(-1)[:, None] + chol @ z).T.reshape(n, -1, 4)
            res.append(self.normalizer.normalize(s))
        return torch.tensor(np.array(res), dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ll_kind": self.ll_kind, "estimator": "exact (Gaussian conditioning)"}
