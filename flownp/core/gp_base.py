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

import math
from dataclasses import dataclass

import torch

_MAD_TO_STD = 1.4826
KERNELS = ("se", "matern52", "matern32")


def kernel(d2: torch.Tensor, ell: torch.Tensor, kind: str) -> torch.Tensor:
    """Unit-variance stationary kernel of squared distances d2 (..., n, m) at length scales ell
    (broadcast to (..., 1, 1))."""
    if kind == "se":
        return torch.exp(-0.5 * d2 / ell**2)
    r = torch.sqrt(d2.clamp_min(0) + 1e-30) / ell
    if kind == "matern52":
        a = math.sqrt(5.0) * r
        return (1 + a + a * a / 3) * torch.exp(-a)
    if kind == "matern32":
        a = math.sqrt(3.0) * r
        return (1 + a) * torch.exp(-a)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kind!r}")


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances (..., n, m) between points a (..., n, k) and b (..., m, k)."""
    d2 = a.pow(2).sum(-1)[..., :, None] + b.pow(2).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)
    return d2.clamp_min(0)


def invariant_subset(xc: torch.Tensor, k: int) -> torch.Tensor:
    """(B, min(k, n)) indices of context points chosen by a hash of their coordinates, so the subset is
    the same set whatever the order of the context (the fit is permutation invariant)."""
    n = xc.shape[1]
    if n <= k:
        return torch.arange(n, device=xc.device).expand(xc.shape[0], n)
    h = torch.frac(torch.sin(xc[..., 0].double() * 12.9898 + xc[..., 1].double() * 78.233) * 43758.5453)
    return h.argsort(dim=1)[:, :k]


@dataclass(frozen=True)
class GPFitSettings:
    """The hyperparameter grid (model coordinates: 2 units per degree) and fit subset size."""

    kernels: tuple[str, ...] = ("matern52", "se")
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


def fit_hyper(xc: torch.Tensor, zc: torch.Tensor, st: GPFitSettings) -> GPHyper:
    """Maximum marginal likelihood over the grid, per task and variable (float64). The mean is zero
    (zc is standardised); the signal variance is profiled out: s2 = z^T R^-1 z / m."""
    idx = invariant_subset(xc, st.fit_points)
    x = torch.gather(xc.double(), 1, idx[..., None].expand(-1, -1, xc.shape[-1]))
    z = torch.gather(zc.double(), 1, idx[..., None].expand(-1, -1, zc.shape[-1]))  # (B, m, D)
    b, m, d = z.shape
    d2 = _sqdist(x, x)  # (B, m, m)
    ells = torch.logspace(math.log10(st.ell_min), math.log10(st.ell_max), st.n_ell, dtype=torch.float64,
                          device=xc.device)
    rs = torch.tensor(st.noise_ratios, dtype=torch.float64, device=xc.device)
    eye = torch.eye(m, dtype=torch.float64, device=xc.device)
    best = torch.full((b, d), math.inf, dtype=torch.float64, device=xc.device)
    out = [torch.zeros((b, d), dtype=torch.float64, device=xc.device) for _ in range(4)]
    for ki, kind in enumerate(st.kernels):
        r0 = kernel(d2[:, None], ells.view(1, -1, 1, 1), kind)  # (B, E, m, m)
        rr = r0[:, :, None] + rs.view(1, 1, -1, 1, 1) * eye  # (B, E, R, m, m)
        chol, info = torch.linalg.cholesky_ex(rr)
        alpha = torch.linalg.solve_triangular(chol, z[:, None, None].expand(-1, len(ells), len(rs), -1, -1),
                                              upper=False)  # (B, E, R, m, D)
        s2 = alpha.pow(2).sum(-2) / m  # (B, E, R, D)
        logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (B, E, R)
        nll = 0.5 * m * torch.log(s2.clamp_min(1e-300)) + logdet[..., None]
        nll = torch.where((info == 0)[..., None], nll, torch.full_like(nll, math.inf))
        flat = nll.reshape(b, -1, d)
        val, arg = flat.min(1)  # (B, D)
        better = val < best
        ei, ri = arg // len(rs), arg % len(rs)
        s2_best = torch.gather(s2.reshape(b, -1, d), 1, arg[:, None]).squeeze(1)
        best = torch.where(better, val, best)
        for o, v in zip(out, (torch.full_like(val, ki), ells[ei], s2_best, rs[ri] * s2_best)):
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

    def whiten(self, z: torch.Tensor) -> torch.Tensor:
        r = (z.double() - self.mu).transpose(1, 2)  # (B, D, n_t)
        e = r * self.w if self.diagonal else (self.w @ r[..., None]).squeeze(-1)
        return e.transpose(1, 2)

    def colour(self, eps: torch.Tensor) -> torch.Tensor:
        """eps (B, S, n_t, D) or (B, n_t, D) -> z of the same shape."""
        e = eps.double()
        squeeze = e.dim() == 3
        if squeeze:
            e = e[:, None]
        et = e.permute(0, 1, 3, 2)  # (B, S, D, n_t)
        z = et * self.w_inv[:, None] if self.diagonal else (self.w_inv[:, None] @ et[..., None]).squeeze(-1)
        z = z.permute(0, 1, 3, 2) + self.mu[:, None]
        return z[:, 0] if squeeze else z


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
        for j in range(d):
            kind, ell = st.kernels[int(hyp.kind[i, j])], hyp.ell[i, j]
            s2, noise = hyp.s2[i, j], hyp.noise[i, j]
            chol = _cholesky(s2 * kernel(dcc[i], ell, kind) + noise * eye_c)
            kt = s2 * kernel(dtc[i], ell, kind)  # (nt, n)
            mu[i, :, j] = (kt @ torch.cholesky_solve(zc[i, :, j, None], chol)).squeeze(-1)
            v = torch.linalg.solve_triangular(chol, kt.T, upper=False)  # (n, nt)
            cov[i, j] = s2 * kernel(dtt[i], ell, kind) + noise * eye_t - v.T @ v
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
    scale = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for k in range(tries):
        chol, info = torch.linalg.cholesky_ex(a + scale * 10.0 ** (-10 + 2 * k) * eye)
        if not bool((info != 0).any()):
            return chol
    raise torch.linalg.LinAlgError("GP covariance not positive definite even with jitter")


@dataclass
class TaskTransform:
    """The per-task bijection y (normalised) <-> the flow's state, for one batch of tasks.
    loc, scale (B, 1, D): the standardisation; base: the GP whitening (None: identity)."""

    loc: torch.Tensor
    scale: torch.Tensor
    base: GaussianBase | None
    n_targets: int

    def repeat(self, n: int) -> "TaskTransform":
        """The same transforms for n copies of each task: batch B -> B * n (copy index fastest), e.g. to
        score n samples of one task without fitting its GP n times."""
        r = lambda x: x.repeat_interleave(n, dim=0)  # noqa: E731
        base = None if self.base is None else GaussianBase(r(self.base.mu), r(self.base.w), r(self.base.w_inv),
                                                           r(self.base.logdet_w), self.base.diagonal)
        return TaskTransform(r(self.loc), r(self.scale), base, self.n_targets)

    def context(self, yc: torch.Tensor) -> torch.Tensor:
        """What the network sees of the context: standardised values, (B, n_ctx, D)."""
        return ((yc - self.loc) / self.scale).to(yc.dtype)

    def forward(self, yt: torch.Tensor) -> torch.Tensor:
        """Targets (B, n_t, D) -> the flow's data-side state eps (B, n_t, D)."""
        z = (yt.double() - self.loc) / self.scale
        return (self.base.whiten(z) if self.base is not None else z).to(yt.dtype)

    def inverse(self, eps: torch.Tensor) -> torch.Tensor:
        """eps (B, S, n_t, D) or (B, n_t, D) -> targets in normalised units, same shape."""
        z = self.base.colour(eps) if self.base is not None else eps.double()
        loc, scale = (self.loc, self.scale) if eps.dim() == 3 else (self.loc[:, None], self.scale[:, None])
        return (z * scale + loc).to(eps.dtype)

    def log_jacobian(self) -> torch.Tensor:
        """(B,) log|det d eps / d y| over the whole target set, nats."""
        lj = -self.n_targets * torch.log(self.scale).sum((-1, -2))
        if self.base is not None:
            lj = lj + self.base.logdet_w
        return lj


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
    loc = y.median(dim=1, keepdim=True).values
    mad = (y - loc).abs().median(dim=1, keepdim=True).values
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
