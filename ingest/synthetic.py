"""Synthetic Gaussian-process winter weather on the region's grid, with an exact oracle.

The real data source may be unreachable; this module generates ERA5-like maps whose law is known in
closed form, so that the exact conditional log-likelihood of any context/target task (the oracle, the
best any model can score) can be computed and compared with a neural process.

The model (all four fields jointly Gaussian, a linear-Gaussian model on the exact 41 x 41 grid):

    sp  = mu_sp(lat, lon)  + P                                  + e_sp      [kPa]
    t2m = mu_t(lat)        + a * P + T_large + T_small          + e_t       [degC]
    u10 = u_mean           - c * dP/dy             + U_small    + e_u       [m/s]
    v10 = v_mean           + c * dP/dx             + V_small    + e_v       [m/s]

- `P, T_large, T_small, U_small, V_small` are independent zero-mean Gaussian fields, each with a
  separable (Kronecker latitude x longitude) stationary kernel k(dy) k(dx) with the distances in km
  (latitude: 111.195 km per degree; longitude: 111.195 km * cos(centre latitude) per degree, so a
  length scale means the same distance both ways);
- `dP/dy`, `dP/dx` are finite differences on the grid (central inside, one-sided at the edges) in kPa
  per 100 km, with the physical spacing of every row (dx shrinks with cos(latitude) of the row):
  a geostrophic-like wind, u ~ -dp/dy (westerly when pressure falls to the north), v ~ +dp/dx;
- `e_*` is an iid per-point noise floor (it also keeps every covariance positive definite);
- `mu_sp` is a fixed plane (lower pressure to the north-west, where the terrain rises) and `mu_t` a
  north-south gradient (colder north); the winds have constant means.

Sampling is cheap (`L_lat Z L_lon^T` per latent field); consecutive hourly maps can be correlated by an
AR(1) on the latent white noise with a stationary N(0, I) marginal, so every single map has exactly the
stated Gaussian law whatever the time correlation (the noise floor is white in time).

Ordering conventions: grid arrays are (..., lat, lon, variable) with latitudes ascending (i_lat = 0 is
the south edge) and model variable order (sp, t2m, u10, v10); point sets are circle point indices
0..P-1 of `Region.circle_index`; covariances over points are **point-major**: row `4 * k + v` is
variable v of the k-th point asked for, i.e. the order of `values.reshape(-1)` for values (n, 4).
"""

from __future__ import annotations

import json
import math
import time as _time
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Sequence

import numpy as np
import typer
from scipy import linalg as sla

from ingest.io import atomic_path, sha256_file, write_json_atomic
from ingest.parsing import parse_int_list, valid_times
from ingest.normalize import Normalizer
from ingest.region import MEMPHIS, Region
from ingest.variables import NAMES, VARIABLES, model_to_era5

KM_PER_DEGREE = 111.195  # great-circle km per degree on a sphere of radius 6371 km
MANIFEST_NAME = "gp_weather_manifest.json"
FILE_PATTERN = "era5_memphis_{year}.nc"
KernelName = Literal["se", "matern12", "matern32", "matern52"]
_KERNELS = ("se", "matern12", "matern32", "matern52")
_LOG_2PI = math.log(2.0 * math.pi)

SeedLike = int | np.random.Generator | np.random.SeedSequence | None


# ==================================================================================================
# configuration
# ==================================================================================================
@dataclass(frozen=True)
class GPWeatherConfig:
    """Every setting of the synthetic weather law (model physical units: kPa, degC, m/s; km; hours).

    Defaults: realistic Memphis-winter scales (sp spread ~1.2 kPa, t2m anomalies ~6 degC with a
    1 degC/degree north-south gradient, winds ~3 m/s std)."""

    # surface pressure: mean plane + one smooth large-scale field
    sp_mean: float = 100.1            # kPa at the region centre
    sp_grad_north: float = -0.05      # kPa per degree latitude (mean pattern)
    sp_grad_east: float = 0.05        # kPa per degree longitude (lower to the north-west)
    sp_std: float = 1.2               # kPa, std of the pressure anomaly P
    sp_length_km: float = 500.0
    sp_kernel: str = "se"
    # 2 m temperature: mean gradient + coupling to P + large-scale and small-scale anomalies
    t2m_mean: float = 7.5             # degC at the centre latitude
    t2m_grad_north: float = -1.0      # degC per degree latitude (colder north)
    t2m_pressure_coeff: float = -1.0  # degC per kPa of P (winter highs are cold)
    t2m_large_std: float = 5.5        # degC
    t2m_large_length_km: float = 600.0
    t2m_large_kernel: str = "se"
    t2m_small_std: float = 1.2        # degC
    t2m_small_length_km: float = 100.0
    t2m_small_kernel: str = "matern52"
    # 10 m winds: geostrophic-like part from dP plus their own small-scale parts
    u_mean: float = 0.0               # m/s
    v_mean: float = 0.0               # m/s
    wind_coeff: float = 10.0          # m/s per (kPa / 100 km) of pressure gradient
    wind_small_std: float = 1.5       # m/s, each of u and v
    wind_small_length_km: float = 150.0
    wind_small_kernel: str = "matern52"
    # iid noise floor per variable (sp kPa, t2m degC, u m/s, v m/s)
    noise_sp: float = 0.005
    noise_t2m: float = 0.05
    noise_u10: float = 0.05
    noise_v10: float = 0.05
    # AR(1) correlation time of the latent fields between consecutive maps (hours; 0 = independent)
    time_correlation_hours: float = 12.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_kernel"):
                if v not in _KERNELS:
                    raise ValueError(f"{f.name} must be one of {_KERNELS}, got {v!r}")
            elif not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{f.name} must be a finite number, got {v!r}")
        for name in ("sp_std", "t2m_large_std", "t2m_small_std", "wind_small_std", "wind_coeff",
                     "time_correlation_hours"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("sp_length_km", "t2m_large_length_km", "t2m_small_length_km",
                     "wind_small_length_km", "noise_sp", "noise_t2m", "noise_u10", "noise_v10"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def noise(self) -> tuple[float, float, float, float]:
        """The noise-floor std per variable in model order."""
        return (self.noise_sp, self.noise_t2m, self.noise_u10, self.noise_v10)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPWeatherConfig":
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown GPWeatherConfig setting(s): {sorted(unknown)}")
        return cls(**{k: (str(v) if k.endswith("_kernel") else float(v)) for k, v in d.items()})


# ==================================================================================================
# kernels and grid operators
# ==================================================================================================
def kernel_1d(x_km: np.ndarray, length_km: float, kind: str) -> np.ndarray:
    """Unit-variance stationary kernel matrix on 1-D positions (km)."""
    r = np.abs(x_km[:, None] - x_km[None, :]) / length_km
    if kind == "se":
        return np.exp(-0.5 * r * r)
    if kind == "matern12":
        return np.exp(-r)
    if kind == "matern32":
        s = math.sqrt(3.0) * r
        return (1.0 + s) * np.exp(-s)
    if kind == "matern52":
        s = math.sqrt(5.0) * r
        return (1.0 + s + s * s / 3.0) * np.exp(-s)
    raise ValueError(f"unknown kernel {kind!r}")


def _psd_sqrt(k: np.ndarray) -> np.ndarray:
    """A square root L (L L^T = K with negative round-off eigenvalues clipped to 0)."""
    w, q = np.linalg.eigh(k)
    return q * np.sqrt(np.clip(w, 0.0, None))


def difference_matrix(n: int) -> np.ndarray:
    """(n, n) finite difference in index units: central inside, one-sided at the two edges."""
    d = np.zeros((n, n))
    i = np.arange(1, n - 1)
    d[i, i + 1] = 0.5
    d[i, i - 1] = -0.5
    d[0, 0], d[0, 1] = -1.0, 1.0
    d[n - 1, n - 2], d[n - 1, n - 1] = -1.0, 1.0
    return d


@dataclass(frozen=True)
class _Term:
    """One linear contribution `coef * A_lat F_source A_lon^T` of a latent field to a variable."""

    source: str
    coef: float
    a_lat: np.ndarray | None  # None = identity
    a_lon: np.ndarray | None


def _sandwich(a: np.ndarray | None, k: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """A K B^T with None meaning the identity."""
    out = k if a is None else a @ k
    return out if b is None else out @ b.T


# ==================================================================================================
# results
# ==================================================================================================
@dataclass(frozen=True)
class OracleResult:
    """Exact conditional log-likelihood of targets given context (batched: arrays of shape (B,),
    single task: 0-d arrays).

    - `joint`: log p(targets | context) in NORMALISED units [nats] (= joint_physical + n_targets *
      normalizer.log_std_sum);
    - `tar_ll`: joint / n_targets: nats per target point, 4 variables summed, normalised units (the
      protocol's metric);
    - `joint_physical`, `tar_ll_physical`: the same in model physical units (kPa, degC, m/s)."""

    joint: np.ndarray
    tar_ll: np.ndarray
    joint_physical: np.ndarray
    tar_ll_physical: np.ndarray
    n_context: np.ndarray
    n_targets: np.ndarray
    log_std_sum: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


# ==================================================================================================
# the generator and oracle
# ==================================================================================================
class GPWeather:
    """The synthetic weather law on `region`'s grid: sampler, exact moments and exact oracle."""

    SOURCES = ("p", "t_large", "t_small", "u_small", "v_small")

    def __init__(self, config: GPWeatherConfig | None = None, region: Region = MEMPHIS) -> None:
        self.config = config if config is not None else GPWeatherConfig()
        self.region = region
        c = self.config
        n = region.size
        self._y_km = (region.lats - region.centre_lat) * KM_PER_DEGREE
        self._x_km = (region.lons - region.centre_lon) * KM_PER_DEGREE * math.cos(
            math.radians(region.centre_lat))
        spec = {  # source -> (std, length_km, kernel)
            "p": (c.sp_std, c.sp_length_km, c.sp_kernel),
            "t_large": (c.t2m_large_std, c.t2m_large_length_km, c.t2m_large_kernel),
            "t_small": (c.t2m_small_std, c.t2m_small_length_km, c.t2m_small_kernel),
            "u_small": (c.wind_small_std, c.wind_small_length_km, c.wind_small_kernel),
            "v_small": (c.wind_small_std, c.wind_small_length_km, c.wind_small_kernel),
        }
        self._std = {s: spec[s][0] for s in self.SOURCES}
        # per source: square roots (L_lat, L_lon) and the exact kernels they define (K = L L^T)
        self._sqrt: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._kern: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s in self.SOURCES:
            _, length, kind = spec[s]
            len_lat, len_lon = self._axis_lengths(length)
            l_lat = _psd_sqrt(kernel_1d(self._y_km, len_lat, kind))
            l_lon = _psd_sqrt(kernel_1d(self._x_km, len_lon, kind))
            self._sqrt[s] = (l_lat, l_lon)
            self._kern[s] = (l_lat @ l_lat.T, l_lon @ l_lon.T)
        # pressure gradient operators in kPa per 100 km
        d = difference_matrix(n)
        dy_100km = region.resolution * KM_PER_DEGREE / 100.0
        dx_100km = dy_100km * np.cos(np.radians(region.lats))  # per row
        d_north = d / dy_100km                      # acts on the latitude axis
        row_scale = np.diag(1.0 / dx_100km)         # acts on the latitude axis (rows)
        sp = c.sp_std
        self._terms: tuple[tuple[_Term, ...], ...] = (
            (_Term("p", sp, None, None),),
            (_Term("p", c.t2m_pressure_coeff * sp, None, None),
             _Term("t_large", c.t2m_large_std, None, None),
             _Term("t_small", c.t2m_small_std, None, None)),
            (_Term("p", -c.wind_coeff * sp, d_north, None),
             _Term("u_small", c.wind_small_std, None, None)),
            (_Term("p", c.wind_coeff * sp, row_scale, d),
             _Term("v_small", c.wind_small_std, None, None)),
        )
        self._noise = np.asarray(c.noise, dtype=np.float64)

    def _axis_lengths(self, length_km: float) -> tuple[float, float]:
        """(latitude, longitude) length scales [km] of a source with length `length_km`: isotropic
        here; subclasses (ingest.prior) stretch them for anisotropy."""
        return length_km, length_km

    # ---- construction helpers ----------------------------------------------------------------
    @classmethod
    def from_manifest(cls, path: str | Path) -> "GPWeather":
        """Rebuild the law from a `synthesize` output directory or its manifest file."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        d = json.loads(path.read_text())
        if d.get("kind") != "gp_weather":
            raise ValueError(f"{path}: not a GP-weather manifest (kind={d.get('kind')!r})")
        region = Region.from_dict(d["region"]) if "region" in d else MEMPHIS
        return cls(GPWeatherConfig.from_dict(d["config"]), region)

    # ---- means ------------------------------------------------------------------------------
    @cached_property
    def grid_mean(self) -> np.ndarray:
        """(size, size, 4) mean maps in model units, latitudes ascending."""
        c, r = self.config, self.region
        dlat = (r.lats - r.centre_lat)[:, None] * np.ones((1, r.size))
        dlon = np.ones((r.size, 1)) * (r.lons - r.centre_lon)[None, :]
        out = np.empty((r.size, r.size, 4))
        out[..., 0] = c.sp_mean + c.sp_grad_north * dlat + c.sp_grad_east * dlon
        out[..., 1] = c.t2m_mean + c.t2m_grad_north * dlat
        out[..., 2] = c.u_mean
        out[..., 3] = c.v_mean
        return out

    @cached_property
    def circle_mean(self) -> np.ndarray:
        """(P, 4) mean at the circle points."""
        ci = self.region.circle_index
        return self.grid_mean[ci[:, 0], ci[:, 1]]

    def _points(self, points: Any) -> np.ndarray:
        p = np.asarray(points, dtype=np.int64).reshape(-1)
        if p.size and (p.min() < 0 or p.max() >= self.region.n_points):
            raise ValueError(f"point indices must be in 0..{self.region.n_points - 1}")
        return p

    def mean(self, points: Any) -> np.ndarray:
        """(n, 4) exact mean at circle points `points` (model units)."""
        return self.circle_mean[self._points(points)].copy()

    # ---- covariances ------------------------------------------------------------------------
    def _grid_factors(self, v: int, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Cov(var v, var w) on the grid as a sum of Kronecker products (lat factor, lon factor)."""
        out = []
        for tv in self._terms[v]:
            for tw in self._terms[w]:
                if tv.source != tw.source:
                    continue
                k_lat, k_lon = self._kern[tv.source]
                out.append((tv.coef * tw.coef * _sandwich(tv.a_lat, k_lat, tw.a_lat),
                            _sandwich(tv.a_lon, k_lon, tw.a_lon)))
        return out

    def grid_covariance_block(self, v: int | str, w: int | str) -> np.ndarray:
        """(size^2, size^2) covariance of variable v with variable w over the whole grid (row-major
        grid order i_lat * size + i_lon), noise floor included. Not cached (22 MB each)."""
        v, w = (NAMES.index(x) if isinstance(x, str) else int(x) for x in (v, w))
        n2 = self.region.size ** 2
        out = np.zeros((n2, n2))
        for a, b in self._grid_factors(v, w):
            out += np.kron(a, b)
        if v == w:
            out[np.diag_indices(n2)] += self._noise[v] ** 2
        return out

    @cached_property
    def circle_covariance(self) -> np.ndarray:
        """(P, 4, P, 4) float64 covariance over all circle points (cached, ~200 MB for P = 1245);
        `.reshape(4P, 4P)` is the point-major covariance."""
        return self.grid_points_covariance(self.region.circle_index)

    def grid_points_covariance(self, ci: np.ndarray) -> np.ndarray:
        """(n, 4, n, 4) float64 covariance at grid points ci (n, 2) = (i_lat, i_lon)."""
        il, jl = ci[:, 0], ci[:, 1]
        n = len(ci)
        out = np.empty((n, 4, n, 4))
        for v in range(4):
            for w in range(v, 4):
                blk = np.zeros((n, n))
                for a, b in self._grid_factors(v, w):
                    blk += a[np.ix_(il, il)] * b[np.ix_(jl, jl)]
                if v == w:
                    blk[np.diag_indices(n)] += self._noise[v] ** 2
                out[:, v, :, w] = blk
                if w != v:
                    out[:, w, :, v] = blk.T
        return out

    def covariance(self, points: Any) -> np.ndarray:
        """(4n, 4n) exact covariance at circle points `points`, point-major (row 4 k + v)."""
        p = self._points(points)
        rows = (4 * p[:, None] + np.arange(4)).reshape(-1)
        full = self.circle_covariance.reshape(4 * self.region.n_points, 4 * self.region.n_points)
        return full[np.ix_(rows, rows)]

    def marginal_std(self) -> np.ndarray:
        """(P, 4) exact marginal std of every variable at every circle point."""
        c = self.circle_covariance
        idx = np.arange(c.shape[0])
        return np.sqrt(np.stack([c[idx, v, idx, v] for v in range(4)], axis=-1))

    # ---- sampling ---------------------------------------------------------------------------
    @staticmethod
    def _left(a: np.ndarray, f: np.ndarray) -> np.ndarray:
        """a @ f[k] for every k of f (n, r, c), as one matrix product."""
        n, r, c = f.shape
        return (a @ f.transpose(1, 0, 2).reshape(r, n * c)).reshape(a.shape[0], n, c).transpose(1, 0, 2)

    @staticmethod
    def _right(f: np.ndarray, b: np.ndarray) -> np.ndarray:
        """f[k] @ b.T for every k of f (n, r, c), as one matrix product."""
        n, r, c = f.shape
        return (f.reshape(n * r, c) @ b.T).reshape(n, r, b.shape[0])

    def _latent_to_maps(self, z: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """z (n, S, lat, lon) unit white noise of the latent sources, eps (n, lat, lon, 4) unit white
        noise of the floor -> maps (n, lat, lon, 4) in model units (same operators as the
        covariance: field_s = L_lat z_s L_lon^T, variable = sum coef * A_lat field A_lon^T)."""
        fields_ = {}
        for k, s in enumerate(self.SOURCES):
            l_lat, l_lon = self._sqrt[s]
            fields_[s] = self._right(self._left(l_lat, np.ascontiguousarray(z[:, k])), l_lon)
        out = np.empty((4,) + z.shape[:1] + z.shape[2:])  # variable-first while accumulating
        for v, terms in enumerate(self._terms):
            acc = out[v]
            acc[...] = self.grid_mean[..., v]
            for t in terms:
                f = fields_[t.source]
                if t.a_lat is not None:
                    f = self._left(t.a_lat, f)
                if t.a_lon is not None:
                    f = self._right(f, t.a_lon)
                acc += t.coef * f
        out = np.moveaxis(out, 0, -1)
        out += eps * self._noise
        return out

    def sample_sequence(self, hours: Sequence[float] | np.ndarray, seed: SeedLike = None, *,
                        dtype: Any = np.float64) -> np.ndarray:
        """Maps (n, lat, lon, 4) at strictly increasing times `hours` (n,), AR(1)-correlated in time:
        the latent white noise starts from the stationary N(0, I) and follows
        z_k = rho_k z_{k-1} + sqrt(1 - rho_k^2) e_k with rho_k = exp(-(h_k - h_{k-1}) / tau),
        tau = config.time_correlation_hours (0: independent maps). Every map has exactly the
        stationary law; the noise floor is white in time."""
        rng = np.random.default_rng(seed)
        h = np.asarray(hours, dtype=np.float64).reshape(-1)
        if h.size > 1 and np.any(np.diff(h) <= 0):
            raise ValueError("hours must be strictly increasing")
        n, s, g = h.size, len(self.SOURCES), self.region.size
        z = rng.standard_normal((n, s, g, g))
        eps = rng.standard_normal((n, g, g, 4))
        tau = self.config.time_correlation_hours
        if n > 1 and tau > 0:
            rho = np.exp(-np.diff(h) / tau)
            for k in range(1, n):
                if rho[k - 1] > 0.0:
                    z[k] = rho[k - 1] * z[k - 1] + math.sqrt(1.0 - rho[k - 1] ** 2) * z[k]
        return self._latent_to_maps(z, eps).astype(dtype, copy=False)

    def sample_maps(self, n: int, seed: SeedLike = None, *, hourly: bool = False,
                    dtype: Any = np.float64, chunk: int = 1024) -> np.ndarray:
        """(n, lat, lon, 4) maps in model units (kPa, degC, m/s), latitudes ascending.
        `hourly=False`: independent maps; `hourly=True`: consecutive hourly maps, AR(1)-correlated."""
        if n < 0:
            raise ValueError("n must be >= 0")
        rng = np.random.default_rng(seed)
        if hourly:
            return self.sample_sequence(np.arange(n, dtype=np.float64), rng, dtype=dtype)
        g, s = self.region.size, len(self.SOURCES)
        out = np.empty((n, g, g, 4), dtype=dtype)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            z = rng.standard_normal((m, s, g, g))
            eps = rng.standard_normal((m, g, g, 4))
            out[start:start + m] = self._latent_to_maps(z, eps)
        return out

    def to_points(self, maps: np.ndarray) -> np.ndarray:
        """(..., lat, lon, 4) maps -> (..., P, 4) values at the circle points."""
        ci = self.region.circle_index
        return np.asarray(maps)[..., ci[:, 0], ci[:, 1], :]

    # ---- conditioning and the oracle --------------------------------------------------------
    def _joint_factor(self, ctx: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cholesky factor (lower) of the covariance over [context; targets] and that joint mean."""
        if tgt.size == 0:
            raise ValueError("at least one target point is needed")
        allp = np.concatenate([ctx, tgt])
        if np.unique(allp).size != allp.size:
            raise ValueError("context and target point indices must be distinct (and unique)")
        cov = self.covariance(allp)
        chol = sla.cholesky(cov, lower=True, overwrite_a=True, check_finite=False)
        return chol, self.circle_mean[allp].reshape(-1)

    @staticmethod
    def _values(values: Any, n: int, name: str) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 2:
            v = v[None]
        if v.ndim != 3 or v.shape[1:] != (n, 4):
            raise ValueError(f"{name} must have shape ([B,] {n}, 4), got {np.shape(values)}")
        return v

    def _loglik_shared(self, ctx: np.ndarray, cvals: np.ndarray, tgt: np.ndarray,
                       tvals: np.ndarray) -> np.ndarray:
        """(B,) physical log p(targets | context) for one shared index split, values (B, n, 4)."""
        chol, mu = self._joint_factor(ctx, tgt)
        y = np.concatenate([cvals, tvals], axis=1).reshape(cvals.shape[0], -1) - mu  # (B, D)
        r = sla.solve_triangular(chol, y.T, lower=True, check_finite=False)          # (D, B)
        nc = 4 * ctx.size
        logdet = 2.0 * np.sum(np.log(np.diag(chol)[nc:]))
        return -0.5 * np.sum(r[nc:] ** 2, axis=0) - 0.5 * logdet - 0.5 * (4 * tgt.size) * _LOG_2PI

    def oracle_log_likelihood(self, context_idx: Any, context_values: Any, target_idx: Any,
                              target_values: Any, normalizer: Normalizer) -> OracleResult:
        """Exact log density of the targets given the context (Gaussian conditioning in float64 via
        one Cholesky factor of the joint covariance ordered [context; targets]; no inverses).

        Shapes: indices (n,) circle point indices shared by all tasks, or (B, n) one set per task;
        values (n, 4) or (B, n, 4) in model physical units. An empty context (n_ctx = 0) gives the
        unconditional density. Batched input gives (B,) results, a single task 0-d arrays."""
        cidx = np.asarray(context_idx, dtype=np.int64)
        tidx = np.asarray(target_idx, dtype=np.int64)
        cv = np.asarray(context_values, dtype=np.float64)
        tv = np.asarray(target_values, dtype=np.float64)
        batched = tv.ndim == 3
        if cidx.ndim == 2 or tidx.ndim == 2:
            if cidx.ndim != 2 or tidx.ndim != 2 or not batched or cidx.shape[0] != tidx.shape[0]:
                raise ValueError("per-task indices need (B, n) context and target indices and "
                                 "(B, n, 4) values")
            b = tidx.shape[0]
            cv = cv.reshape(b, cidx.shape[1], 4)
            phys = np.array([
                self._loglik_shared(self._points(cidx[i]), cv[i:i + 1], self._points(tidx[i]),
                                    self._values(tv[i], tidx.shape[1], "target_values"))[0]
                for i in range(b)])
            n_ctx, n_tgt = cidx.shape[1], tidx.shape[1]
        else:
            c, t = self._points(cidx), self._points(tidx)
            tv3 = self._values(tv, t.size, "target_values")
            cv3 = (np.zeros((tv3.shape[0], 0, 4)) if c.size == 0 and cv.size == 0
                   else self._values(cv, c.size, "context_values"))
            if cv3.shape[0] != tv3.shape[0]:
                if cv3.shape[0] == 1:
                    cv3 = np.broadcast_to(cv3, (tv3.shape[0],) + cv3.shape[1:])
                else:
                    raise ValueError("context and target values have different batch sizes")
            phys = self._loglik_shared(c, cv3, t, tv3)
            n_ctx, n_tgt = c.size, t.size
        lss = normalizer.log_std_sum
        joint = phys + n_tgt * lss
        if not batched:
            phys, joint = phys[0], joint[0]
        shape = np.shape(joint)
        return OracleResult(
            joint=np.asarray(joint), tar_ll=np.asarray(joint / n_tgt),
            joint_physical=np.asarray(phys), tar_ll_physical=np.asarray(phys / n_tgt),
            n_context=np.full(shape, n_ctx), n_targets=np.full(shape, n_tgt), log_std_sum=lss)

    def conditional(self, context_idx: Any, context_values: Any,
                    target_idx: Any) -> tuple[np.ndarray, np.ndarray]:
        """Exact conditional law of the targets given the context: mean ([B,] n_t, 4) in model units
        and covariance (4 n_t, 4 n_t), point-major (it does not depend on the values)."""
        c, t = self._points(context_idx), self._points(target_idx)
        chol, mu = self._joint_factor(c, t)
        nc = 4 * c.size
        l_tc, l_tt = chol[nc:, :nc], chol[nc:, nc:]
        cov = l_tt @ l_tt.T
        cv = np.asarray(context_values, dtype=np.float64)
        batched = cv.ndim == 3
        cv3 = np.zeros((1, 0, 4)) if c.size == 0 and cv.size == 0 else self._values(cv, c.size,
                                                                                   "context_values")
        if c.size:
            r = sla.solve_triangular(chol[:nc, :nc], (cv3.reshape(cv3.shape[0], -1) - mu[:nc]).T,
                                     lower=True, check_finite=False)
            m = (mu[nc:, None] + l_tc @ r).T
        else:
            m = np.broadcast_to(mu[nc:], (cv3.shape[0], mu.size - nc)).copy()
        m = m.reshape(-1, t.size, 4)
        return (m if batched else m[0]), cov

    def conditional_entropy(self, context_idx: Any, target_idx: Any) -> float:
        """Differential entropy [nats, physical units] of the targets given the context:
        0.5 * (d log(2 pi e) + logdet Sigma_cond); minus it is the expected oracle log-likelihood."""
        c, t = self._points(context_idx), self._points(target_idx)
        chol, _ = self._joint_factor(c, t)
        logdet = 2.0 * np.sum(np.log(np.diag(chol)[4 * c.size:]))
        return 0.5 * (4 * t.size * (_LOG_2PI + 1.0) + logdet)


# ==================================================================================================
# netCDF in the ERA5 layouts
# ==================================================================================================
_GRIB = {"sp": (134, "sp"), "t2m": (167, "2t"), "u10": (165, "10u"), "v10": (166, "10v")}


def _pack_params(values: np.ndarray) -> tuple[float, float]:
    """int16 (scale_factor, add_offset) in the old-CDS style, spanning the data with 65533 steps so
    that packed values lie in -32766..32767 and never hit the _FillValue -32767."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    scale = (hi - lo) / 65533.0
    if not scale > 0.0:
        scale = 1.0
    return scale, lo + 32766.0 * scale


def write_era5_netcdf(maps: np.ndarray, times: Any, path: str | Path, *,
                      layout: Literal["legacy", "current"] = "legacy", packed: bool = False,
                      lon360: bool = False, descending_lat: bool = True, long_names: bool = False,
                      region: Region = MEMPHIS, attrs: dict[str, Any] | None = None) -> Path:
    """Write maps (n, lat, lon, 4) in model units (kPa, degC, m/s; latitudes ascending) as an ERA5
    single-levels netCDF4 file in ERA5 units (sp Pa, t2m K, winds m s-1), atomically.

    layout "legacy": dimension `time` (int32 hours since 1900-01-01), float32 coordinates;
    layout "current" (CDS since 2024): dimension `valid_time` (int64 seconds since 1970-01-01), scalar
    coordinate `number` = 0, coordinate `expver` along valid_time ("0001"), float64 coordinates.
    Values float32 (NaN fill), or int16 with scale_factor/add_offset and _FillValue -32767 when
    `packed`. Latitudes north first unless `descending_lat=False`; longitudes 0..360 if `lon360`;
    variable names `2m_temperature` etc. if `long_names`, else `sp`, `t2m`, `u10`, `v10`."""
    import pandas as pd
    import xarray as xr

    if layout not in ("legacy", "current"):
        raise ValueError(f"layout must be 'legacy' or 'current', got {layout!r}")
    maps = np.asarray(maps)
    g = region.size
    if maps.ndim != 4 or maps.shape[1:] != (g, g, 4):
        raise ValueError(f"maps must have shape (n, {g}, {g}, 4), got {maps.shape}")
    t = pd.DatetimeIndex(pd.to_datetime(np.asarray(times).reshape(-1))).values.astype("datetime64[ns]")
    if t.size != maps.shape[0]:
        raise ValueError(f"{t.size} times for {maps.shape[0]} maps")
    era5 = model_to_era5(maps)  # float64 (n, lat, lon, 4)
    lats = region.lats.copy()
    lons = region.lons.copy()
    if descending_lat:
        era5 = era5[:, ::-1]
        lats = lats[::-1]
    if lon360:
        lons = np.mod(lons, 360.0)
        order = np.argsort(lons, kind="stable")
        lons, era5 = lons[order], era5[:, :, order]
    current = layout == "current"
    tdim = "valid_time" if current else "time"
    coord_dtype = np.float64 if current else np.float32
    coords: dict[str, Any] = {
        tdim: (tdim, t),
        "latitude": ("latitude", lats.astype(coord_dtype),
                     {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude"}),
        "longitude": ("longitude", lons.astype(coord_dtype),
                      {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude"}),
    }
    if current:
        coords["number"] = ((), np.int64(0), {"long_name": "ensemble member numerical id",
                                              "units": "1", "standard_name": "realization"})
        coords["expver"] = (tdim, np.array(["0001"] * t.size, dtype=object),
                            {"long_name": "Experiment version"})
    data_vars: dict[str, Any] = {}
    encoding: dict[str, Any] = {
        tdim: ({"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian",
                "dtype": "int64"} if current else
               {"units": "hours since 1900-01-01 00:00:00.0", "calendar": "gregorian",
                "dtype": "int32"}),
        "latitude": {"_FillValue": None}, "longitude": {"_FillValue": None},
    }
    if current:
        encoding["number"] = {"_FillValue": None}
    for k, var in enumerate(VARIABLES):
        name = var.cds_name if long_names else var.name
        vattrs = {"units": var.era5_units, "long_name": var.long_name,
                  "standard_name": var.standard_name}
        if current:
            pid, short = _GRIB[var.name]
            vattrs = {"GRIB_paramId": pid, "GRIB_shortName": short, "GRIB_units": var.era5_units,
                      "GRIB_name": var.long_name, **vattrs}
        vals = era5[..., k]
        if packed:  # xarray packs the float64 values: round((x - offset) / scale)
            scale, offset = _pack_params(vals)
            data_vars[name] = ((tdim, "latitude", "longitude"), vals, vattrs)
            encoding[name] = {"dtype": "int16", "scale_factor": scale, "add_offset": offset,
                              "_FillValue": np.int16(-32767), "missing_value": np.int16(-32767)}
        else:
            data_vars[name] = ((tdim, "latitude", "longitude"), vals.astype(np.float32), vattrs)
            encoding[name] = {"dtype": "float32", "_FillValue": np.float32(np.nan)}
    gattrs = ({"GRIB_centre": "ecmf",
               "GRIB_centreDescription": "European Centre for Medium-Range Weather Forecasts",
               "GRIB_subCentre": 0, "Conventions": "CF-1.7",
               "institution": "European Centre for Medium-Range Weather Forecasts"}
              if current else {"Conventions": "CF-1.6"})
    gattrs.update(attrs or {})
    ds = xr.Dataset(data_vars, coords=coords, attrs=gattrs)
    path = Path(path)
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
    return path


# ==================================================================================================
# whole seasons of files
# ==================================================================================================
def season_times(year: int, months: Iterable[int] = (1, 2, 12), days: Iterable[int] | None = None,
                 hours: Iterable[int] = range(24)) -> np.ndarray:
    """Hourly valid times (datetime64[ns], increasing) of the chosen days (all if None; days a month
    lacks are skipped) of the chosen months of `year`."""
    hs = sorted({int(h) for h in hours})
    if any(h < 0 or h > 23 for h in hs):
        raise ValueError("hours must be in 0..23")
    ms = sorted({int(m) for m in months})
    for m in ms:
        if not 1 <= m <= 12:
            raise ValueError(f"month {m} is not in 1..12")
    ds = None if days is None else sorted({int(d) for d in days})
    for d in ds or ():
        if not 1 <= d <= 31:
            raise ValueError(f"day {d} is not in 1..31")
    return np.array(valid_times([year], ms, ds, hs), dtype="datetime64[ns]")


def year_seed(seed: int, year: int) -> np.random.SeedSequence:
    """The random stream of one year's file: depends only on (seed, year), so a year's file is the same
    whichever other years are generated with it."""
    return np.random.SeedSequence([int(seed), int(year)])


def synthesis_settings(years: Iterable[int], months: Iterable[int], days: Iterable[int] | None,
                       hours: Iterable[int], *, seed: int, layout: str, packed: bool) -> tuple[list[int], dict[str, Any]]:
    """(sorted years, the settings a synthesis job records): sorted, de-duplicated months, days (None: every
    day) and hours, the seed and the file layout. Shared by the GP-law and broad-prior jobs."""
    settings = {"seed": int(seed), "months": sorted({int(m) for m in months}),
                "days": None if days is None else sorted({int(d) for d in days}),
                "hours": sorted({int(h) for h in hours}), "layout": layout, "packed": bool(packed)}
    return sorted({int(y) for y in years}), settings


def synthesize(out_dir: str | Path, years: Iterable[int], *, months: Iterable[int] = (1, 2, 12),
               days: Iterable[int] | None = None, hours: Iterable[int] = range(24), seed: int = 0,
               layout: Literal["legacy", "current"] = "current", packed: bool = False,
               lon360: bool = False, descending_lat: bool = True, long_names: bool = False,
               config: GPWeatherConfig | None = None, region: Region = MEMPHIS,
               progress: bool = True) -> list[Path]:
    """Write one ERA5-like netCDF per year, `era5_memphis_{year}.nc`, of hourly synthetic maps on the
    chosen days/months/hours (AR(1)-correlated in time), plus `gp_weather_manifest.json` holding the
    config, region, seed and files, from which `GPWeather.from_manifest(out_dir)` rebuilds the oracle.
    Seeded: the same seed gives identical values (and files)."""
    from tqdm.auto import tqdm

    config = config if config is not None else GPWeatherConfig()
    gp = GPWeather(config, region)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    years, settings = synthesis_settings(years, months, days, hours, seed=seed, layout=layout, packed=packed)
    months_l, days_l, hours_l = settings["months"], settings["days"], settings["hours"]
    settings.update({"lon360": bool(lon360), "descending_lat": bool(descending_lat),
                     "long_names": bool(long_names)})
    prov = {"source": "synthetic GP weather (flownp-weather ingest.synthetic); not ERA5 data",
            "synthetic_config": json.dumps(config.to_dict(), sort_keys=True),
            "synthetic_seed": int(seed)}
    paths: list[Path] = []
    files: dict[str, dict[str, Any]] = {}
    bar = tqdm(years, desc="synthesize", unit="year", disable=not progress)
    for year in bar:
        times = season_times(year, months_l, days_l, hours_l)
        if times.size == 0:
            raise ValueError(f"no valid times in {year} for months {months_l}, days {days_l}")
        hrs = (times - times[0]) / np.timedelta64(1, "h")
        maps = gp.sample_sequence(hrs, np.random.default_rng(year_seed(seed, year)))
        path = out_dir / FILE_PATTERN.format(year=year)
        write_era5_netcdf(maps, times, path, layout=layout, packed=packed, lon360=lon360,
                          descending_lat=descending_lat, long_names=long_names, region=region,
                          attrs={**prov, "synthetic_year": int(year)})
        paths.append(path)
        files[path.name] = {"year": year, "n_maps": int(times.size), "sha256": sha256_file(path)}
        bar.set_postfix(year=year, maps=int(times.size))
    manifest_path = out_dir / MANIFEST_NAME
    manifest = {"kind": "gp_weather", "version": 1, "config": config.to_dict(),
                "region": region.to_dict(), **settings, "years": years, "files": files}
    if manifest_path.exists():  # add to an earlier run with the same law and settings
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = {}
        same = (old.get("kind") == "gp_weather" and old.get("config") == manifest["config"]
                and old.get("region") == manifest["region"]
                and all(old.get(k) == v for k, v in settings.items()))
        if same:
            merged = {**old.get("files", {}), **files}
            manifest["files"] = dict(sorted(merged.items()))
            manifest["years"] = sorted(set(old.get("years", [])) | set(years))
    write_json_atomic(manifest_path, manifest)
    return paths


# ==================================================================================================
# command line (registered by ingest.cli as `flownp-ingest synthesize`)
# ==================================================================================================
def synthesize_cli(
    out: Annotated[Path, typer.Option("--out", help="Output directory for era5_memphis_{year}.nc.")],
    years: Annotated[str, typer.Option("--years", help="Years, e.g. '1986,1988-1989'.")] = "1986-2017",
    months: Annotated[str, typer.Option("--months", help="Months, e.g. '1,2,12'.")] = "1,2,12",
    days: Annotated[str, typer.Option("--days", help="Days of month, e.g. '1-5' (default: all).")] = "",
    hours: Annotated[str, typer.Option("--hours", help="Hours, e.g. '0-23'.")] = "0-23",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    layout: Annotated[str, typer.Option("--layout", help="current (valid_time) or legacy (time).")]
    = "current",
    packed: Annotated[bool, typer.Option("--packed/--no-packed",
                                          help="int16 scale/offset packing.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
    law: Annotated[str, typer.Option(
        "--law", help="gp: one fixed GP winter (default); broad: the broad prior of ingest.prior "
                      "(every map draws its own law; all seasons, terrain, fronts).")] = "gp",
    prior_config: Annotated[Optional[Path], typer.Option(
        "--prior-config", help="With --law broad: JSON file of BroadPriorConfig settings "
                               "(ingest/prior.py) overriding its defaults.")] = None,
) -> None:
    """Write synthetic GP weather as ERA5-like netCDF files (with an exact-likelihood manifest)."""
    if layout not in ("current", "legacy"):
        raise typer.BadParameter("layout must be 'current' or 'legacy'", param_hint="--layout")
    if law not in ("gp", "broad"):
        raise typer.BadParameter("law must be 'gp' or 'broad'", param_hint="--law")
    try:
        ys = parse_int_list(years)
        ms = parse_int_list(months)
        ds = parse_int_list(days) if days.strip() else None
        hs = parse_int_list(hours)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    t0 = _time.perf_counter()
    if prior_config is not None and law != "broad":
        raise typer.BadParameter("--prior-config needs --law broad", param_hint="--prior-config")
    if law == "broad":
        from ingest.prior import PRIOR_MANIFEST_NAME, BroadPriorConfig, synthesize_broad

        try:
            cfg = (BroadPriorConfig.from_dict(json.loads(prior_config.read_text()))
                   if prior_config is not None else BroadPriorConfig())
        except (OSError, ValueError, TypeError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--prior-config") from exc
        paths = synthesize_broad(out, ys, months=ms, days=ds, hours=hs, seed=seed, layout=layout,  # type: ignore[arg-type]
                                 packed=packed, config=cfg, progress=progress)
        manifest = Path(out) / PRIOR_MANIFEST_NAME
    else:
        paths = synthesize(out, ys, months=ms, days=ds, hours=hs, seed=seed,
                           layout=layout, packed=packed, progress=progress)  # type: ignore[arg-type]
        manifest = Path(out) / MANIFEST_NAME
    typer.echo(f"wrote {len(paths)} file(s) to {out} in {_time.perf_counter() - t0:.1f} s "
               f"(manifest {manifest})")
