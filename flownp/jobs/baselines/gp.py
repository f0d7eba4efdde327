"""GP regression with kernel hyperparameters fitted to each task's context (what a geostatistician
would use on real data): one GP per variable in normalised units, squared-exponential kernel plus
noise, hyperparameters (length scale, variance, noise) by maximum marginal likelihood on (a seeded
subset of) the context, then exact conditioning on the whole context. The targets' density is joint
across points and independent across variables."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import linalg as sla
from scipy.optimize import minimize

from ingest.tasks import TaskBatch


def _se(a: np.ndarray, b: np.ndarray, ell: float, var: float) -> np.ndarray:
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return var * np.exp(-0.5 * d2 / ell**2)


def _cholesky(a: np.ndarray, max_tries: int = 6) -> tuple[np.ndarray, bool]:
    """Lower Cholesky factor (in scipy's cho_factor form) of a symmetric matrix that should be positive
    definite but may have lost it to rounding (a posterior covariance K_tt - V^T V with a tiny noise, or
    repeated context points): jitter of 1e-10, 1e-8, ... times the mean diagonal is added until it
    factors. Raises LinAlgError if even the largest jitter fails."""
    scale = abs(float(np.mean(np.diag(a)))) or 1.0
    for k in range(max_tries):
        jitter = 0.0 if k == 0 else scale * 10.0 ** (-12 + 2 * k)
        try:
            return sla.cho_factor(a + jitter * np.eye(len(a)), lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError(f"matrix not positive definite even with jitter {jitter:.1e}")


def _nlml(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    ell, var, noise = np.exp(theta)
    k = _se(x, x, ell, var) + (noise + 1e-6) * np.eye(len(x))
    try:
        c = sla.cho_factor(k, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return 1e10
    mu = y.mean()
    alpha = sla.cho_solve(c, y - mu, check_finite=False)
    return float(0.5 * (y - mu) @ alpha + np.log(np.diag(c[0])).sum() + 0.5 * len(x) * math.log(2 * math.pi))


@dataclass
class FittedGPPredictor:
    max_fit_points: int = 300
    seed: int = 0
    name: str = "GP (fitted)"
    ll_kind: str = "joint over points, independent variables"

    def _posterior(self, xc: np.ndarray, yc: np.ndarray, xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per variable: mean (nt,) and covariance (nt, nt) of the noisy targets."""
        rng = np.random.default_rng(self.seed)
        sub = rng.permutation(len(xc))[: self.max_fit_points]
        bounds = [(math.log(0.05), math.log(50.0)), (math.log(1e-3), math.log(1e2)), (math.log(1e-6), math.log(10.0))]
        # restarts from short, medium and long length scales guard against a poor local optimum of the
        # marginal likelihood; the best of them is kept
        fits = [minimize(_nlml, np.log([ell0, 1.0, 0.01]), args=(xc[sub], yc[sub]), method="L-BFGS-B", bounds=bounds)
                for ell0 in (0.5, 2.0, 8.0)]
        ell, var, noise = np.exp(min(fits, key=lambda r: r.fun).x)
        mu = yc.mean()
        kcc = _se(xc, xc, ell, var) + (noise + 1e-6) * np.eye(len(xc))
        c = _cholesky(kcc)
        ktc = _se(xt, xc, ell, var)
        mean = mu + ktc @ sla.cho_solve(c, yc - mu, check_finite=False)
        v = sla.solve_triangular(c[0], ktc.T, lower=True, check_finite=False)
        cov = _se(xt, xt, ell, var) + (noise + 1e-6) * np.eye(len(xt)) - v.T @ v
        return mean, cov

    def _task(self, batch: TaskBatch, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        xc, xt = batch.xc[i].double().numpy(), batch.xt[i].double().numpy()
        return [self._posterior(xc, batch.yc[i, :, j].double().numpy(), xt) for j in range(4)]

    def log_likelihood(self, batch: TaskBatch) -> torch.Tensor:
        out = []
        for i in range(batch.xt.shape[0]):
            tot = 0.0
            for j, (m, cov) in enumerate(self._task(batch, i)):
                r = batch.yt[i, :, j].double().numpy() - m
                c = _cholesky(cov)
                tot += -0.5 * r @ sla.cho_solve(c, r) - np.log(np.diag(c[0])).sum() - 0.5 * len(r) * math.log(2 * math.pi)
            out.append(tot)
        return torch.tensor(out, dtype=torch.float64)

    def sample(self, batch: TaskBatch, n: int, generator: torch.Generator) -> torch.Tensor:
        out = []
        for i in range(batch.xt.shape[0]):
            cols = []
            for m, cov in self._task(batch, i):
                chol = np.tril(_cholesky(cov)[0])
                z = torch.randn((len(m), n), generator=generator, dtype=torch.float64).numpy()
                cols.append((m[:, None] + chol @ z).T)  # (n, nt)
            out.append(np.stack(cols, -1))
        return torch.tensor(np.array(out), dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ll_kind": self.ll_kind, "estimator": "exact Gaussian",
                "kernel": "squared exponential + noise per variable", "max_fit_points": self.max_fit_points,
                "fit": "max marginal likelihood, L-BFGS-B from 3 length scales", "cholesky": "jitter up to 1e-2 x mean variance if needed"}
