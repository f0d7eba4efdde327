"""A broad weather prior for synthetic pretraining: every map draws its own law.

`GPWeather` (ingest.synthetic) is one fixed synthetic winter. Here each map first draws its
hyperparameters from the ranges of a `BroadPriorConfig`, then a map from the law they define:

    params  ~ prior(config)                       (`BroadWeatherPrior.draw_params`)
    map | params ~ N(mu(params), Sigma(params))   (`MapLaw`, a `GPWeather` with an extra mean field)

- Sigma(params): the `GPWeather` linear-Gaussian model (sp anomaly P, t2m coupled to P, geostrophic-
  like winds from dP, small-scale parts, noise floor) with the drawn amplitudes, length scales
  (100-1500 km), kernel smoothness (se / matern12/32/52), pressure-wind coupling, noise floors and an
  anisotropy ratio (lat length / lon length). The kernels are separable (Kronecker lat x lon), so the
  anisotropy is AXIS-ALIGNED only: no rotated orientations (they would break the Kronecker factors).
- mu(params) = the GPWeather mean plane (drawn means and gradients: t2m -15..35 degC, sp 96..104 kPa
  before terrain, i.e. all seasons) + a FIXED terrain height field H (m; smooth, deterministic from
  `terrain_seed`, 0..~600 m rising to the north-west) entering sp (-0.012 kPa/m) and t2m (-6.5 K/km)
  + a fixed land-sea/diurnal-like t2m pattern times a drawn amplitude + an east-west t2m gradient
  + with probability p_front a FRONT: a straight boundary (random orientation and position) with a
  tanh profile of width 10-50 km carrying a temperature jump (2-12 K), a wind shift (the mean wind
  veers across it) and a pressure trough (sech^2) along it.

Exact oracle, and where there is none: given ALL of a map's parameters (front included: it is then a
known mean shift) the map is exactly Gaussian, so `MapLaw.oracle_log_likelihood` is the exact
log p(targets | context, params). A model never sees the parameters: the true predictive of the
prior, p(targets | context) = E_{params | context}[...], mixes over hyperparameters and front
geometry and has no closed form (the marginal law of a map is non-Gaussian: fronts are jumps a GP
cannot express). The oracle conditional on the parameters is therefore an UPPER BOUND on what any
model can score in expectation, not the score of the Bayes-optimal model.

Season: by default t2m_mean is drawn over its whole range whatever the map's time, so a winter-only
time axis still covers all seasons; `season_from_time=True` centres it on the map's day of year.

Reproducibility: map parameters and values are a pure function of (seed, valid time):
`map_seed(seed, time)` keys on the hour since 1970, so a store's map (its time) gives back its law.
`synthesize_broad` also writes every map's parameters to a JSON sidecar per year.

Units: kPa, degC, m/s, km, m (terrain). Grids are (lat, lon[, 4]) with latitudes ascending.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Literal

import numpy as np

from ingest.configs import DictConfig
from ingest.io import sha256_file, write_json_atomic
from ingest.region import MEMPHIS, Region
from ingest.synthetic import (
    FILE_PATTERN,
    KM_PER_DEGREE,
    GPWeather,
    GPWeatherConfig,
    _KERNELS,
    _psd_sqrt,
    kernel_1d,
    season_times,
    synthesis_settings,
    write_era5_netcdf,
)

PRIOR_MANIFEST_NAME = "broad_prior_manifest.json"
PARAMS_PATTERN = "broad_prior_params_{year}.json"
PRIOR_VERSION = 1
Range = tuple[float, float]

# ranges drawn log-uniformly (scales); every other range is drawn uniformly
_LOG_RANGES = ("sp_std", "t2m_large_std", "t2m_small_std", "wind_small_std", "sp_length_km",
               "t2m_large_length_km", "t2m_small_length_km", "wind_small_length_km", "noise_sp",
               "noise_t2m", "noise_wind", "front_width_km", "front_trough_width_km")
_POSITIVE = ("sp_length_km", "t2m_large_length_km", "t2m_small_length_km", "wind_small_length_km",
             "noise_sp", "noise_t2m", "noise_wind", "front_width_km", "front_trough_width_km")
_NONNEG = ("sp_std", "t2m_large_std", "t2m_small_std", "wind_small_std", "wind_coeff",
           "front_dt", "front_wind_speed", "front_trough_kpa", "front_veer_deg")


# ==================================================================================================
# configuration
# ==================================================================================================
@dataclass(frozen=True)
class BroadPriorConfig(DictConfig):
    """Ranges (lo, hi) of the per-map hyperparameters (kPa, degC, m/s, km) and the fixed fields."""

    STRICT_KEYS: ClassVar[bool] = True  # written by hand (--prior-config): a misspelt key is an error

    # means and gradients (uniform): all seasons
    sp_mean: Range = (96.0, 104.0)               # kPa at the centre, before terrain
    sp_grad_north: Range = (-0.3, 0.3)           # kPa / degree
    sp_grad_east: Range = (-0.3, 0.3)            # kPa / degree
    t2m_mean: Range = (-15.0, 35.0)              # degC at the centre (terrain-free sea level)
    t2m_grad_north: Range = (-2.0, 0.5)          # degC / degree
    t2m_grad_east: Range = (-0.5, 0.5)           # degC / degree
    u_mean: Range = (-6.0, 6.0)                  # m/s
    v_mean: Range = (-6.0, 6.0)                  # m/s
    # amplitudes (log-uniform)
    sp_std: Range = (0.3, 2.0)                   # kPa
    t2m_large_std: Range = (1.0, 7.0)            # degC
    t2m_small_std: Range = (0.2, 2.5)            # degC
    wind_small_std: Range = (0.5, 3.0)           # m/s
    # couplings (uniform)
    t2m_pressure_coeff: Range = (-1.5, 1.0)      # degC / kPa
    wind_coeff: Range = (0.0, 15.0)              # m/s per (kPa / 100 km)
    # length scales (log-uniform, km) and anisotropy (lat/lon length ratio in [1/a, a], log-uniform)
    sp_length_km: Range = (300.0, 1500.0)
    t2m_large_length_km: Range = (200.0, 1500.0)
    t2m_small_length_km: Range = (50.0, 300.0)
    wind_small_length_km: Range = (60.0, 400.0)
    anisotropy_max: float = 2.0
    # kernel smoothness, drawn uniformly from these names (sp is kept smooth: its finite differences
    # drive the winds)
    sp_kernels: tuple[str, ...] = ("se", "matern52")
    kernels: tuple[str, ...] = _KERNELS
    # noise floors (log-uniform; sp kPa, t2m degC, each wind m/s)
    noise_sp: Range = (0.002, 0.02)
    noise_t2m: Range = (0.02, 0.3)
    noise_wind: Range = (0.02, 0.3)
    # fixed terrain (m) and its effects
    terrain_seed: int = 20240
    terrain_max_m: float = 600.0
    terrain_sp_kpa_per_m: float = -0.012         # about -12 Pa per metre
    terrain_lapse_degc_per_km: float = -6.5
    # land-sea / diurnal-like t2m pattern amplitude (degC, uniform)
    diurnal_amp: Range = (-4.0, 4.0)
    # fronts
    p_front: float = 0.5
    front_width_km: Range = (10.0, 50.0)         # tanh width
    front_dt: Range = (2.0, 12.0)                # degC jump, warm minus cold side
    front_wind_speed: Range = (2.0, 8.0)         # m/s of the front-relative mean wind
    front_veer_deg: Range = (45.0, 135.0)        # clockwise turn of that wind from warm to cold side
    front_trough_kpa: Range = (0.1, 1.0)         # depth of the trough along the line
    front_trough_width_km: Range = (30.0, 150.0)
    front_offset_max_km: float = 400.0           # |signed distance of the line from the centre|
    # season: off = t2m_mean uniform over its range whatever the map's time (a winter-only time axis
    # still sees all seasons); on = a seasonal centre from the day of year (coldest ~20 Jan) spanning
    # the range shrunk by season_jitter_degc, plus a uniform jitter of +- season_jitter_degc
    season_from_time: bool = False
    season_jitter_degc: float = 6.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("kernels"):
                if not isinstance(v, tuple) or not v:
                    raise ValueError(f"{f.name} must be a non-empty tuple of kernel names")
                bad = [k for k in v if k not in _KERNELS]
                if bad:
                    raise ValueError(f"{f.name}: unknown kernel name(s) {bad}; choose from {_KERNELS}")
            elif isinstance(v, tuple):
                if len(v) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
                    raise ValueError(f"{f.name} must be a (min, max) pair of finite numbers, got {v!r}")
                if v[0] > v[1]:
                    raise ValueError(f"{f.name}: min {v[0]} > max {v[1]}")
                if f.name in _POSITIVE and v[0] <= 0:
                    raise ValueError(f"{f.name} must be > 0 (length scales and noise floors), got {v!r}")
                if f.name in _NONNEG and v[0] < 0:
                    raise ValueError(f"{f.name} must be >= 0, got {v!r}")
            elif isinstance(v, bool):
                continue
            elif not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{f.name} must be a finite number, got {v!r}")
        lo, hi = self.t2m_mean
        if not 0.0 <= self.season_jitter_degc <= 0.5 * (hi - lo):
            raise ValueError(f"season_jitter_degc must be in [0, (t2m_mean max - min) / 2 = "
                             f"{0.5 * (hi - lo)}], got {self.season_jitter_degc}")
        if not 0.0 <= self.p_front <= 1.0:
            raise ValueError(f"p_front is a probability and must be in [0, 1], got {self.p_front}")
        if self.anisotropy_max < 1.0:
            raise ValueError(f"anisotropy_max must be >= 1 (1 = isotropic), got {self.anisotropy_max}")
        if self.terrain_max_m < 0 or self.front_offset_max_km < 0:
            raise ValueError("terrain_max_m and front_offset_max_km must be >= 0")



# ==================================================================================================
# per-map parameters
# ==================================================================================================
@dataclass(frozen=True)
class FrontParams:
    """A straight front: unit normal at `angle_deg` (from east, counter-clockwise; it points to the
    warm side), line at signed distance `offset_km` from the centre, tanh width `width_km`."""

    angle_deg: float
    offset_km: float
    width_km: float
    dt: float               # degC, warm minus cold side
    wind_speed: float       # m/s
    wind_dir_deg: float     # direction the warm-side mean wind blows TO (from east, ccw)
    veer_deg: float         # clockwise turn of the mean wind from the warm to the cold side
    trough_kpa: float
    trough_width_km: float


@dataclass(frozen=True)
class MapParams:
    """Everything one map's law depends on (given the prior's fixed terrain and pattern)."""

    gp: GPWeatherConfig
    length_ratio: float       # lat length / lon length (axis-aligned anisotropy)
    t2m_grad_east: float      # degC / degree
    diurnal_amp: float        # degC times the fixed pattern
    front: FrontParams | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"gp": self.gp.to_dict(), "length_ratio": self.length_ratio,
                "t2m_grad_east": self.t2m_grad_east, "diurnal_amp": self.diurnal_amp,
                "front": None if self.front is None else asdict(self.front)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MapParams":
        fr = d.get("front")
        return cls(GPWeatherConfig.from_dict(d["gp"]), float(d["length_ratio"]),
                   float(d["t2m_grad_east"]), float(d["diurnal_amp"]),
                   None if fr is None else FrontParams(**{k: float(v) for k, v in fr.items()}))


# ==================================================================================================
# one map's law: GPWeather + anisotropy + a known extra mean field
# ==================================================================================================
class MapLaw(GPWeather):
    """The exact Gaussian law of one map given its parameters: `GPWeather` with lat/lon length scales
    L * sqrt(r), L / sqrt(r) and `extra_mean` (lat, lon, 4) added to its mean. Sampling, `mean`,
    `covariance`, `conditional`, `oracle_log_likelihood` all follow. `covariance` is computed for the
    asked points only (no 200 MB whole-circle cache per map)."""

    def __init__(self, config: GPWeatherConfig, extra_mean: np.ndarray, length_ratio: float = 1.0,
                 region: Region = MEMPHIS) -> None:
        self._ratio = float(length_ratio)
        self._extra_mean = np.asarray(extra_mean, dtype=np.float64)
        super().__init__(config, region)

    def _axis_lengths(self, length_km: float) -> tuple[float, float]:
        s = math.sqrt(self._ratio)
        return length_km * s, length_km / s

    @cached_property
    def grid_mean(self) -> np.ndarray:
        """(lat, lon, 4) mean: the GPWeather plane plus the extra mean field."""
        return GPWeather.grid_mean.func(self) + self._extra_mean  # type: ignore[attr-defined]

    def covariance(self, points: Any) -> np.ndarray:
        """(4n, 4n) exact covariance at circle points `points`, point-major (row 4 k + v)."""
        p = self._points(points)
        return self.grid_points_covariance(self.region.circle_index[p]).reshape(4 * p.size, 4 * p.size)

    def sample_one(self, rng: np.random.Generator) -> np.ndarray:
        """One map (lat, lon, 4) in model units."""
        g, s = self.region.size, len(self.SOURCES)
        return self._latent_to_maps(rng.standard_normal((1, s, g, g)),
                                    rng.standard_normal((1, g, g, 4)))[0]


# ==================================================================================================
# the prior
# ==================================================================================================
def map_seed(seed: int, time: Any) -> np.random.SeedSequence:
    """The random stream of the map valid at `time` (datetime64-like, whole hours): depends only on
    (seed, hour since 1970), so a store's map time gives back its parameters and values."""
    h = int(np.datetime64(time, "h").astype(np.int64))
    return np.random.SeedSequence([int(seed), 0xB80AD, h + 10**8])


class BroadWeatherPrior:
    """Draws per-map parameters and maps; `law(params)` is the exact Gaussian law of a map."""

    def __init__(self, config: BroadPriorConfig | None = None, region: Region = MEMPHIS) -> None:
        self.config = config if config is not None else BroadPriorConfig()
        self.region = region
        r = region
        self._y_km = (r.lats - r.centre_lat) * KM_PER_DEGREE                      # (lat,)
        self._x_km = (r.lons - r.centre_lon) * KM_PER_DEGREE * math.cos(math.radians(r.centre_lat))
        self._dlon = np.broadcast_to((r.lons - r.centre_lon)[None, :], (r.size, r.size))

    # ---- fixed fields ------------------------------------------------------------------------
    @cached_property
    def terrain_m(self) -> np.ndarray:
        """(lat, lon) fixed terrain height [m]: a smooth ramp rising to the north-west plus smooth
        bumps (SE kernel, 120 km; seeded by `terrain_seed`), scaled to 0..terrain_max_m."""
        r = self.region
        south_north = (r.lats - r.lats[0]) / (r.lats[-1] - r.lats[0])
        east_west = (r.lons[-1] - r.lons) / (r.lons[-1] - r.lons[0])
        ramp = (0.5 * (south_north[:, None] + east_west[None, :])) ** 1.5
        rng = np.random.default_rng(self.config.terrain_seed)
        l_lat = _psd_sqrt(kernel_1d(self._y_km, 120.0, "se"))
        l_lon = _psd_sqrt(kernel_1d(self._x_km, 120.0, "se"))
        bumps = l_lat @ rng.standard_normal((r.size, r.size)) @ l_lon.T
        f = ramp + 0.12 * bumps * (0.3 + ramp)  # rougher where higher
        f = (f - f.min()) / (f.max() - f.min())
        return self.config.terrain_max_m * f

    @cached_property
    def diurnal_pattern(self) -> np.ndarray:
        """(lat, lon) fixed land-sea / diurnal-like pattern (zero mean, max |.| = 1): inland (north)
        and high ground respond more than the Gulf-coast-like south edge."""
        r = self.region
        inland = 1.0 - np.exp(-(r.lats - r.lats[0] + 0.25) / 2.0)
        p = inland[:, None] + 0.3 * self.terrain_m / max(self.config.terrain_max_m, 1.0)
        p = p - p.mean()
        return p / np.abs(p).max()

    # ---- parameters --------------------------------------------------------------------------
    def seasonal_t2m_mean(self, uniform_draw: float, time: Any) -> float:
        """t2m_mean [degC] of a map at `time` from its uniform draw in the t2m_mean range: the
        seasonal centre (lo + j .. hi - j, coldest around 20 January) plus a jitter of +- j."""
        lo, hi = self.config.t2m_mean
        j = self.config.season_jitter_degc
        day = (np.datetime64(time, "D") - np.datetime64(time, "Y").astype("datetime64[D]")).astype(int)
        centre = 0.5 * (lo + hi) - (0.5 * (hi - lo) - j) * math.cos(2.0 * math.pi * (day - 20) / 365.25)
        q = (uniform_draw - lo) / (hi - lo) if hi > lo else 0.5
        return float(centre + (2.0 * q - 1.0) * j)

    def draw_params(self, seed: Any = None, time: Any = None) -> MapParams:
        """One map's parameters from the config's ranges (seed: int, SeedSequence or Generator);
        `time` (datetime64-like) sets the seasonal t2m mean when `season_from_time` (else unused).
        The random stream consumed is the same either way."""
        rng = np.random.default_rng(seed)
        c = self.config

        def u(name: str) -> float:
            lo, hi = getattr(c, name)
            if name in _LOG_RANGES:
                return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            return float(rng.uniform(lo, hi))

        def pick(names: tuple[str, ...]) -> str:
            return names[int(rng.integers(len(names)))]

        wind_std, wind_len, noise_w = u("wind_small_std"), u("wind_small_length_km"), u("noise_wind")
        gp = GPWeatherConfig(
            sp_mean=u("sp_mean"), sp_grad_north=u("sp_grad_north"), sp_grad_east=u("sp_grad_east"),
            sp_std=u("sp_std"), sp_length_km=u("sp_length_km"), sp_kernel=pick(c.sp_kernels),
            t2m_mean=u("t2m_mean"), t2m_grad_north=u("t2m_grad_north"),
            t2m_pressure_coeff=u("t2m_pressure_coeff"), t2m_large_std=u("t2m_large_std"),
            t2m_large_length_km=u("t2m_large_length_km"), t2m_large_kernel=pick(c.kernels),
            t2m_small_std=u("t2m_small_std"), t2m_small_length_km=u("t2m_small_length_km"),
            t2m_small_kernel=pick(c.kernels), u_mean=u("u_mean"), v_mean=u("v_mean"),
            wind_coeff=u("wind_coeff"), wind_small_std=wind_std, wind_small_length_km=wind_len,
            wind_small_kernel=pick(c.kernels), noise_sp=u("noise_sp"), noise_t2m=u("noise_t2m"),
            noise_u10=noise_w, noise_v10=noise_w, time_correlation_hours=0.0)
        if c.season_from_time and time is not None:
            gp = dataclasses.replace(gp, t2m_mean=self.seasonal_t2m_mean(gp.t2m_mean, time))
        a = math.log(c.anisotropy_max)
        ratio = float(math.exp(rng.uniform(-a, a))) if a > 0 else 1.0
        t_east, diurnal = u("t2m_grad_east"), u("diurnal_amp")
        front = None
        if rng.random() < c.p_front:
            front = FrontParams(
                angle_deg=float(rng.uniform(0.0, 360.0)),
                offset_km=float(rng.uniform(-c.front_offset_max_km, c.front_offset_max_km)),
                width_km=u("front_width_km"), dt=u("front_dt"), wind_speed=u("front_wind_speed"),
                wind_dir_deg=float(rng.uniform(0.0, 360.0)), veer_deg=u("front_veer_deg"),
                trough_kpa=u("front_trough_kpa"), trough_width_km=u("front_trough_width_km"))
        return MapParams(gp, ratio, t_east, diurnal, front)

    def params_at(self, seed: int, time: Any) -> MapParams:
        """The parameters of the map valid at `time` of a `synthesize_broad(seed=seed)` run."""
        return self.draw_params(np.random.default_rng(map_seed(seed, time)), time)

    # ---- mean field and law ------------------------------------------------------------------
    def front_distance_km(self, front: FrontParams) -> np.ndarray:
        """(lat, lon) signed distance [km] from the front line, positive on the warm side."""
        th = math.radians(front.angle_deg)
        return (self._x_km[None, :] * math.cos(th) + self._y_km[:, None] * math.sin(th)
                - front.offset_km)

    def extra_mean(self, params: MapParams) -> np.ndarray:
        """(lat, lon, 4) known mean added to the GPWeather plane: terrain (sp, t2m), east-west t2m
        gradient, diurnal pattern, front (t2m jump, mean-wind veer, sp trough). Model units."""
        c, g = self.config, self.region.size
        out = np.zeros((g, g, 4))
        h = self.terrain_m
        out[..., 0] = c.terrain_sp_kpa_per_m * h
        out[..., 1] = (c.terrain_lapse_degc_per_km * h / 1000.0 + params.t2m_grad_east * self._dlon
                       + params.diurnal_amp * self.diurnal_pattern)
        f = params.front
        if f is not None:
            d = self.front_distance_km(f)
            warm = 0.5 * (1.0 + np.tanh(d / f.width_km))              # 0 cold side .. 1 warm side
            out[..., 1] += f.dt * (warm - 0.5)
            out[..., 0] -= f.trough_kpa / np.cosh(d / f.trough_width_km) ** 2
            a_w = math.radians(f.wind_dir_deg)
            a_c = a_w - math.radians(f.veer_deg)                       # clockwise veer
            out[..., 2] += f.wind_speed * (warm * math.cos(a_w) + (1.0 - warm) * math.cos(a_c))
            out[..., 3] += f.wind_speed * (warm * math.sin(a_w) + (1.0 - warm) * math.sin(a_c))
        return out

    def law(self, params: MapParams) -> MapLaw:
        """The exact Gaussian law of a map with these parameters."""
        return MapLaw(params.gp, self.extra_mean(params), params.length_ratio, self.region)

    # ---- sampling ----------------------------------------------------------------------------
    def sample_map(self, seed: Any = None, time: Any = None) -> tuple[MapParams, np.ndarray]:
        """(params, map (lat, lon, 4)) from one random stream: parameters first, then the values
        (`time`: see `draw_params`)."""
        rng = np.random.default_rng(seed)
        p = self.draw_params(rng, time)
        return p, self.law(p).sample_one(rng)

    def sample_maps(self, n: int, seed: Any = None) -> tuple[list[MapParams], np.ndarray]:
        """n independent maps (n, lat, lon, 4), each with its own parameters (child seeds of seed)."""
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        params, maps = [], np.empty((n, self.region.size, self.region.size, 4))
        with blas_threads(1):
            for k, child in enumerate(ss.spawn(n)):
                params_k, maps[k] = self.sample_map(child)
                params.append(params_k)
        return params, maps

    def sample_at_times(self, times: Any, seed: int) -> tuple[list[MapParams], np.ndarray]:
        """Maps (n, lat, lon, 4) valid at `times`, each from `map_seed(seed, time)`."""
        t = np.asarray(times).reshape(-1)
        params, maps = [], np.empty((t.size, self.region.size, self.region.size, 4))
        with blas_threads(1):
            for k, tk in enumerate(t):
                params_k, maps[k] = self.sample_map(map_seed(seed, tk), tk)
                params.append(params_k)
        return params, maps


# ==================================================================================================
# BLAS threads: 41 x 41 products and eigh are many times faster single-threaded (a threaded OpenBLAS
# spin-waits on busy cores: 8 maps/s instead of 150 on a shared 2-core machine)
# ==================================================================================================
def _openblas_handles() -> list[tuple[Any, Any]]:
    """(set, get) num-threads functions of every OpenBLAS loaded in this process (Linux; best effort)."""
    import ctypes

    out = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln})
    except OSError:
        return out
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            set_f = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            get_f = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if set_f is not None and get_f is not None:
                out.append((set_f, get_f))
                break
    return out


@contextmanager
def blas_threads(n: int = 1) -> Iterator[None]:
    """Run the block with `n` OpenBLAS threads (restored afterwards; a no-op where not found)."""
    import ctypes

    handles = _openblas_handles()
    old = [int(g()) for _, g in handles]
    for s, _ in handles:
        s(ctypes.c_int(n))
    try:
        yield
    finally:
        for (s, _), k in zip(handles, old):
            s(ctypes.c_int(k))


# ==================================================================================================
# files
# ==================================================================================================
def synthesize_broad(out_dir: str | Path, years: Iterable[int], *, months: Iterable[int] = (1, 2, 12),
                     days: Iterable[int] | None = None, hours: Iterable[int] = range(24),
                     seed: int = 0, layout: Literal["legacy", "current"] = "current",
                     packed: bool = False, config: BroadPriorConfig | None = None,
                     region: Region = MEMPHIS, progress: bool = True) -> list[Path]:
    """Write `era5_memphis_{year}.nc` per year (ERA5 layout, `write_era5_netcdf`) of independent
    broad-prior maps at the `season_times` of each year, `broad_prior_params_{year}.json` (every map's
    time and parameters) and `broad_prior_manifest.json` (kind "broad_prior": config, region, seed,
    settings, files). Map k of a year is drawn from `map_seed(seed, time_k)`."""
    from tqdm.auto import tqdm

    prior = BroadWeatherPrior(config, region)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    years_l, settings = synthesis_settings(years, months, days, hours, seed=seed, layout=layout, packed=packed)
    months_l, days_l, hours_l = settings["months"], settings["days"], settings["hours"]
    prov = {"source": "synthetic broad weather prior (flownp-weather ingest.prior); not ERA5 data",
            "synthetic_seed": int(seed), "synthetic_law": "broad_prior"}
    paths, files = [], {}
    for year in tqdm(years_l, desc="synthesize broad", unit="year", disable=not progress):
        times = season_times(year, months_l, days_l, hours_l)
        if times.size == 0:
            raise ValueError(f"no valid times in {year} for months {months_l}, days {days_l}")
        params, maps = prior.sample_at_times(times, seed)
        path = out_dir / FILE_PATTERN.format(year=year)
        write_era5_netcdf(maps, times, path, layout=layout, packed=packed, region=region,
                          attrs={**prov, "synthetic_year": int(year)})
        side = out_dir / PARAMS_PATTERN.format(year=year)
        write_json_atomic(side, {"kind": "broad_prior_params", "version": PRIOR_VERSION,
                                 "seed": int(seed), "times": [str(t.astype("datetime64[s]")) for t in times],
                                 "params": [p.to_dict() for p in params]})
        paths.append(path)
        files[path.name] = {"year": year, "n_maps": int(times.size), "sha256": sha256_file(path),
                            "params": side.name}
    mpath = out_dir / PRIOR_MANIFEST_NAME
    manifest = {"kind": "broad_prior", "version": PRIOR_VERSION,
                "config": prior.config.to_dict(), "region": region.to_dict(), **settings,
                "years": years_l, "files": files}
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, ValueError):
            old = {}
        if (old.get("kind") == "broad_prior" and old.get("config") == manifest["config"]
                and old.get("region") == manifest["region"]
                and all(old.get(k) == v for k, v in settings.items())):
            manifest["files"] = dict(sorted({**old.get("files", {}), **files}.items()))
            manifest["years"] = sorted(set(old.get("years", [])) | set(years_l))
    write_json_atomic(mpath, manifest)
    return paths


def prior_from_law(law: dict[str, Any]) -> tuple[BroadWeatherPrior, int]:
    """(prior, seed) from a store manifest's `synthetic` entry of kind "broad_prior"."""
    if law.get("kind") != "broad_prior":
        raise ValueError(f"not a broad-prior law (kind={law.get('kind')!r})")
    if int(law.get("version", PRIOR_VERSION)) != PRIOR_VERSION:
        raise ValueError(f"broad-prior version {law.get('version')} != {PRIOR_VERSION} of this code")
    return (BroadWeatherPrior(BroadPriorConfig.from_dict(law["config"]), Region.from_dict(law["region"])),
            int(law["seed"]))
