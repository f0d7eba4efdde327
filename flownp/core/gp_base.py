"""Per-task transforms between normalised values and the space the flow runs in (docs/protocol.md §10).

Two exact bijections, applied per task and per variable, with their log-Jacobians:

1. **Per-task standardisation** (`standardise="context"`): z = (y - loc) / scale, with loc the median of
   the context values and scale a robust spread (1.4826 MAD, floored at `floor` normalised units so a
   near-constant context stays finite). It is applied to context and targets alike, so the network never
   sees one fixed climate: a task shifted and scaled as a whole looks the same to it.
2. **A Gaussian-process base** (`base="gp"`): per variable, a GP posterior N(mu, Sigma) over the
   (noisy) targets from the standardised context, with hyperparameters (kernel, length scale, noise ratio)
   chosen by maximum marginal likelihood over a grid (the signal variance profiled out in closed form) on
   an order-invariant subset of the context. The flow runs on the whitened targets
   eps = W (z - mu), where W = Sigma^-1/2 (symmetric whitening: `whitening="symmetric"`, permutation
   equivariant, so permuting targets permutes eps) or W = diag(Sigma)^-1/2 (`"diagonal"`). A flow that
   leaves N(0, I) alone reproduces the GP's joint (or per-point) density exactly.

log p(y | context) = log p_flow(eps | context) + log|det d eps / d y|, where
log|det d eps / d y| = -n_tgt * sum_d log scale_d + sum_d log|det W_d|.

Shapes: xc (B, n_ctx, 2) model coordinates, yc (B, n_ctx, D), xt (B, n_tgt, 2), yt (B, n_tgt, D);
all computations in float64 (the posterior of a smooth field is ill-conditioned in float32), results
cast back to the inputs' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

_MAD_TO_STD = 1.4826
KERNELS = ("se", "matern52", "matern32")


def kernel(d2: torch.Tensor, ell: torch.Tensor, kind: str, dist: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-variance stationary kernel of squared distances d2 (..., n, m) at length scales ell
    (broadcast to (..., 1, 1)); `dist`: their square roots (`distances(d2)`), when already computed for
    several kernels or length scales."""
    if kind == "se":
        return torch.exp(-0.5 * d2 / ell**2)
    r = (distances(d2) if dist is None else dist) / ell
    if kind == "matern52":
        a = math.sqrt(5.0) * r
        return (1 + a + a * a / 3) * torch.exp(-a)
    if kind == "matern32":
        a = math.sqrt(3.0) * r
        return (1 + a) * torch.exp(-a)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kind!r}")


def distances(d2: torch.Tensor) -> torch.Tensor:
    """Distances from squared distances (a tiny offset keeps the Matern kernels' gradient finite at 0)."""
    return torch.sqrt(d2.clamp_min(0) + 1e-30)


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances (..., n, m) between points a (..., n, k) and b (..., m, k)."""
    d2 = a.pow(2).sum(-1)[..., :, None] + b.pow(2).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)
    return d2.clamp_min(0)


def invariant_subset(xc: torch.Tensor, yc: torch.Tensor, k: int) -> torch.Tensor:
    """(B, min(k, n)) indices of context points chosen by a hash of their coordinates (ties between
    repeated locations broken by their values), so the subset is the same set whatever the order of the
    context: the fit is permutation invariant."""
    n = xc.shape[1]
    if n <= k:
        return torch.arange(n, device=xc.device).expand(xc.shape[0], n)
    h = torch.frac(torch.sin(xc[..., 0].double() * 12.9898 + xc[..., 1].double() * 78.233) * 43758.5453)
    # ties (repeated locations) are broken by the values, so the kept copy does not depend on the order
    by_value = torch.argsort(yc.double().sum(-1), dim=1, stable=True)
    order = torch.argsort(torch.gather(h, 1, by_value), dim=1, stable=True)
    return torch.gather(by_value, 1, order)[:, :k]


@dataclass(frozen=True)
class GPFitSettings:
    """The hyperparameter grid (model coordinates: 2 units per degree) and fit subset size."""

    kernels: tuple[str, ...] = ("matern32", "matern52")
    ell_min: float = 0.5
    ell_max: float = 60.0
    n_ell: int = 12
    noise_ratios: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    fit_points: int = 256


@dataclass
class GPHyper:
    """Per task and variable: kernel index into settings.kernels, length scale, signal variance and
    noise variance (standardised units). Shapes (B, D)."""

    kind: torch.Tensor
    ell: torch.Tensor
    s2: torch.Tensor
    noise: torch.Tensor


S2_FLOOR = 1e-2  # signal variance floor, standardised units: a constant context variable stays well posed


def fit_hyper(xc: torch.Tensor, zc: torch.Tensor, st: GPFitSettings) -> GPHyper:
    """Maximum marginal likelihood over the grid, per task and variable (float64). The mean is zero
    (zc is standardised); the signal variance is profiled out: s2 = z^T R^-1 z / m, floored at S2_FLOOR
    (a constant context variable, z = 0, would otherwise give a zero covariance). Memory: one length scale
    at a time, (B, n_noise, m, m)."""
    idx = invariant_subset(xc, zc, st.fit_points)
    x = torch.gather(xc.double(), 1, idx[..., None].expand(-1, -1, xc.shape[-1]))
    z = torch.gather(zc.double(), 1, idx[..., None].expand(-1, -1, zc.shape[-1]))  # (B, m, D)
    b, m, d = z.shape
    d2 = _sqdist(x, x)  # (B, m, m)
    dist = distances(d2)
    ells = torch.logspace(math.log10(st.ell_min), math.log10(st.ell_max), st.n_ell, dtype=torch.float64,
                          device=xc.device)
    rs = torch.tensor(st.noise_ratios, dtype=torch.float64, device=xc.device)
    eye = torch.eye(m, dtype=torch.float64, device=xc.device)
    best = torch.full((b, d), math.inf, dtype=torch.float64, device=xc.device)
    out = [torch.zeros((b, d), dtype=torch.float64, device=xc.device) for _ in range(4)]
    zr = z[:, None].expand(-1, len(rs), -1, -1)  # (B, R, m, D)
    for ki, kind in enumerate(st.kernels):
        for ell in ells:
            rr = kernel(d2, ell, kind, dist)[:, None] + rs.view(1, -1, 1, 1) * eye  # (B, R, m, m)
            chol, info = torch.linalg.cholesky_ex(rr)
            alpha = torch.linalg.solve_triangular(chol, zr, upper=False)  # (B, R, m, D)
            s2 = (alpha.pow(2).sum(-2) / m).clamp_min(S2_FLOOR)  # (B, R, D)
            logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (B, R)
            # with s2 floored the profile is no longer exact in s2, so use the full Gaussian nll at s2
            quad = alpha.pow(2).sum(-2) / s2
            nll = 0.5 * quad + 0.5 * m * torch.log(s2) + logdet[..., None]
            nll = torch.where((info == 0)[..., None], nll, torch.full_like(nll, math.inf))
            val, ri = nll.min(1)  # (B, D)
            better = val < best
            s2_best = torch.gather(s2, 1, ri[:, None]).squeeze(1)
            best = torch.where(better, val, best)
            for o, v in zip(out, (torch.full_like(val, ki), ell.expand_as(val), s2_best, rs[ri] * s2_best)):
                o.copy_(torch.where(better, v, o))
    kind_i, ell, s2, noise = out
    return GPHyper(kind_i.long(), ell, s2, noise)


@dataclass
class GaussianBase:
    """Per task and variable, the GP posterior over the targets and its whitening.
    mu (B, n_t, D); w, w_inv (B, D, n_t, n_t) with eps = w (z - mu), z = mu + w_inv eps (symmetric
    whitening) or their diagonals (B, D, n_t) (diagonal whitening); logdet_w (B,) = sum_d log|det W_d|."""

    mu: torch.Tensor
    w: torch.Tensor
    w_inv: torch.Tensor
    logdet_w: torch.Tensor
    diagonal: bool

    def _apply(self, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per variable, the (n_t, n_t) matrix (or diagonal) m applied to v (B, S, n_t, D) -> (B, S, n_t, D),
        the S copies stacked as columns (no copy of m per sample)."""
        cols = v.permute(0, 3, 2, 1)  # (B, D, n_t, S)
        out = cols * m[..., None] if self.diagonal else m @ cols
        return out.permute(0, 3, 2, 1)

    def whiten(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, S, n_t, D) -> eps = W (z - mu), same shape."""
        return self._apply(self.w, z.double() - self.mu[:, None])

    def colour(self, eps: torch.Tensor) -> torch.Tensor:
        """eps (B, S, n_t, D) -> z = mu + W^-1 eps, same shape."""
        return self._apply(self.w_inv, eps.double()) + self.mu[:, None]


def gp_posterior(xc: torch.Tensor, zc: torch.Tensor, xt: torch.Tensor, hyp: GPHyper, st: GPFitSettings,
                 whitening: str = "symmetric") -> GaussianBase:
    """Condition each variable's GP on the whole context: the targets' mean and (noisy) covariance,
    and its whitening (float64)."""
    xc, zc, xt = xc.double(), zc.double(), xt.double()
    b, n, d = zc.shape
    nt = xt.shape[1]
    dcc, dtc, dtt = _sqdist(xc, xc), _sqdist(xt, xc), _sqdist(xt, xt)
    eye_c = torch.eye(n, dtype=torch.float64, device=xc.device)
    eye_t = torch.eye(nt, dtype=torch.float64, device=xc.device)
    mu = torch.empty((b, nt, d), dtype=torch.float64, device=xc.device)
    cov = torch.empty((b, d, nt, nt), dtype=torch.float64, device=xc.device)
    for i in range(b):  # each (task, variable) has its own kernel: evaluate only that one
        rcc, rtc, rtt = distances(dcc[i]), distances(dtc[i]), distances(dtt[i])  # shared by the D variables
        for j in range(d):
            kind, ell = st.kernels[int(hyp.kind[i, j])], hyp.ell[i, j]
            s2, noise = hyp.s2[i, j], hyp.noise[i, j]
            chol = _cholesky(s2 * kernel(dcc[i], ell, kind, rcc) + noise * eye_c)
            kt = s2 * kernel(dtc[i], ell, kind, rtc)  # (nt, n)
            mu[i, :, j] = (kt @ torch.cholesky_solve(zc[i, :, j, None], chol)).squeeze(-1)
            v = torch.linalg.solve_triangular(chol, kt.T, upper=False)  # (n, nt)
            cov[i, j] = s2 * kernel(dtt[i], ell, kind, rtt) + noise * eye_t - v.T @ v
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    if whitening == "diagonal":
        sd = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(1e-12 * hyp.s2[..., None]).sqrt()
        return GaussianBase(mu, 1.0 / sd, sd, -torch.log(sd).sum((-1, -2)), True)
    if whitening != "symmetric":
        raise ValueError(f"whitening must be 'symmetric' or 'diagonal', got {whitening!r}")
    lam, q = torch.linalg.eigh(cov)
    # the noise floor bounds the eigenvalues from below; rounding may not
    lam = lam.clamp_min(0.5 * hyp.noise[..., None])
    w = (q * lam.rsqrt()[..., None, :]) @ q.transpose(-1, -2)
    w_inv = (q * lam.sqrt()[..., None, :]) @ q.transpose(-1, -2)
    return GaussianBase(mu, w, w_inv, -0.5 * torch.log(lam).sum((-1, -2)), False)


def _cholesky(a: torch.Tensor, tries: int = 5) -> torch.Tensor:
    """Batched lower Cholesky factor, adding jitter (1e-10 .. 1e-2 of the mean diagonal) where needed."""
    chol, info = torch.linalg.cholesky_ex(a)
    if not bool((info != 0).any()):
        return chol
    scale = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for k in range(tries):
        chol, info = torch.linalg.cholesky_ex(a + scale * 10.0 ** (-10 + 2 * k) * eye)
        if not bool((info != 0).any()):
            return chol
    raise torch.linalg.LinAlgError("GP covariance not positive definite even with jitter")


@dataclass
class TaskTransform:
    """The per-task bijection y (normalised) <-> the flow's state, for one batch of B tasks.
    loc, scale (B, 1, D): the standardisation; base: the GP whitening (None: identity). `copies` = S means
    the tensors it is applied to hold S copies of each task, batch B * S (copy index fastest), sharing the
    task's transform without copying it (`repeat`)."""

    loc: torch.Tensor
    scale: torch.Tensor
    base: GaussianBase | None
    n_targets: int
    copies: int = 1

    def repeat(self, n: int) -> "TaskTransform":
        """The same transforms for n copies of each task (batch B -> B * n, copy index fastest), e.g. to
        score n samples of one task without fitting its GP n times or copying its whitening n times."""
        return dataclasses.replace(self, copies=self.copies * n)

    def _grouped(self, y: torch.Tensor) -> torch.Tensor:
        """(B * S, n, D) or (B, S, n, D) -> (B, S', n, D) float64 with the task index first."""
        y = y.double()
        if y.dim() == 3:
            return y.reshape(self.loc.shape[0], -1, *y.shape[1:])
        return y

    def context(self, yc: torch.Tensor) -> torch.Tensor:
        """What the network sees of the context: standardised values (B * copies, n_ctx, D)."""
        return self._ungroup((self._grouped(yc) - self.loc[:, None]) / self.scale[:, None], yc)

    @staticmethod
    def _ungroup(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(like.shape).to(like.dtype)

    def forward(self, yt: torch.Tensor) -> torch.Tensor:
        """Targets (B * copies, n_t, D) or (B, S, n_t, D) -> the flow's data-side state eps, same shape."""
        z = (self._grouped(yt) - self.loc[:, None]) / self.scale[:, None]
        return self._ungroup(self.base.whiten(z) if self.base is not None else z, yt)

    def inverse(self, eps: torch.Tensor) -> torch.Tensor:
        """eps (B * copies, n_t, D) or (B, S, n_t, D) -> targets in normalised units, same shape."""
        e = self._grouped(eps)
        z = self.base.colour(e) if self.base is not None else e
        return self._ungroup(z * self.scale[:, None] + self.loc[:, None], eps)

    def log_jacobian(self) -> torch.Tensor:
        """(B * copies,) log|det d eps / d y| over the whole target set of each (copy of a) task, nats."""
        lj = -self.n_targets * torch.log(self.scale).sum((-1, -2))
        if self.base is not None:
            lj = lj + self.base.logdet_w
        return lj.repeat_interleave(self.copies)


def standardiser(yc: torch.Tensor, mode: str, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale), each (B, 1, D) float64: identity for mode "none", else the context's median and
    1.4826 MAD floored at `floor`."""
    b, _, d = yc.shape
    if mode == "none":
        one = torch.ones((b, 1, d), dtype=torch.float64, device=yc.device)
        return one * 0.0, one
    if mode != "context":
        raise ValueError(f"standardise must be 'none' or 'context', got {mode!r}")
    y = yc.double()
    loc = torch.quantile(y, 0.5, dim=1, keepdim=True)  # the mean of the two middle values for even n
    mad = torch.quantile((y - loc).abs(), 0.5, dim=1, keepdim=True)
    return loc, (_MAD_TO_STD * mad).clamp_min(floor)


def task_transform(xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, *, standardise: str, base: str,
                   whitening: str, floor: float, settings: GPFitSettings) -> TaskTransform:
    """The transform of a batch of tasks (no gradients flow through it: it depends on the context only)."""
    with torch.no_grad():
        loc, scale = standardiser(yc, standardise, floor)
        gb = None
        if base == "gp":
            zc = (yc.double() - loc) / scale
            hyp = fit_hyper(xc, zc, settings)
            gb = gp_posterior(xc, zc, xt, hyp, settings, whitening)
        elif base != "standard":
            raise ValueError(f"base must be 'standard' or 'gp', got {base!r}")
    return TaskTransform(loc, scale, gb, xt.shape[1])
