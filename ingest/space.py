"""The model space: the one place that converts between what users send (degrees, ERA5 units) and what the
model sees (model coordinates, normalised values), with the log-Jacobians that carry densities across.

A `ModelSpace` is a region (`ingest.region.Region`: the grid, the circle, degrees <-> model coordinates)
and a normaliser (`ingest.normalize.Normalizer`: model units <-> normalised values, stats from the train
years). It round-trips to a plain dict and is stored in every checkpoint (keys `region`, `normalizer`).
Units (docs/protocol.md §4):
- `era5`:  Pa, K, m s-1 (what the CDS delivers, what the REST API and the notebook take and return);
- `model`: kPa, degC, m s-1 (the scale the normaliser's statistics are in);
- `normalised`: (model - mean) / std per variable.
Log-likelihoods: the model's density is over normalised values; `log_jacobian(units)` per point turns it
into a density over `units` (add n_targets times it). Every reported log-likelihood names its units with
`UNITS[...]` (docs/protocol.md §6): the registry gate, REST and the notebook all report in `era5`.
Domain rules (a point must lie in the trained disc; values must be finite and in physical ranges) raise
one error type, `DomainError`, with a stable code (the service maps it to 422 with that code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from ingest.normalize import Normalizer
from ingest.region import Region
from ingest.variables import BY_NAME, NAMES, era5_to_model, model_to_era5

Units = Literal["era5", "model", "normalised"]

#: the label every reported log-likelihood carries, by the units its values are in
UNITS: dict[str, str] = {
    "era5": "nats, density over ERA5 units (Pa, K, m s-1)",
    "model": "nats, density over model units (kPa, degC, m s-1)",
    "normalised": "nats, density over the checkpoint's normalised values",
}

#: circle points are matched to the context's points to this many decimals of a degree
CIRCLE_MATCH_DECIMALS = 6


class DomainError(ValueError):
    """A point or value outside what the model knows. `code`: swapped_coordinates, longitude_0_360,
    out_of_region, out_of_physical_range, non_finite, missing_variable, no_targets."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _unit_hint(name: str, lo: float, hi: float) -> str:
    if name == "t2m" and -90 <= lo and hi <= 65:
        return " (these look like degrees Celsius: send kelvin, e.g. 273.15 for 0 degC)"
    if name == "sp" and 40 <= lo and hi <= 115:
        return " (these look like kPa: send pascals, e.g. 101325)"
    if name == "sp" and 400 <= lo and hi <= 1150:
        return " (these look like hPa: send pascals, e.g. 101325)"
    return ""


def check_physical(name: str, era5_values: Any) -> None:
    """DomainError (out_of_physical_range) when values of variable `name` in ERA5 units leave its
    plausible range (`Variable.plausible`, checked in model units through the one conversion)."""
    var = BY_NAME[name]
    arr = np.asarray(era5_values, dtype=np.float64)
    if arr.size == 0:
        return
    if not np.all(np.isfinite(arr)):
        raise DomainError("non_finite", f"{name}: values must be finite ({var.era5_units})")
    m = var.era5_to_model(arr)
    lo, hi = var.plausible
    bad = (m < lo) | (m > hi)
    if bad.any():
        glo, ghi = var.model_to_era5(np.array([lo, hi]))
        raise DomainError("out_of_physical_range",
                          f"{name}: {int(bad.sum())} value(s) outside {float(glo):g}..{float(ghi):g} "
                          f"{var.era5_units}{_unit_hint(name, float(arr.min()), float(arr.max()))}")


def log_jacobian(normalizer: Normalizer, units: Units = "era5") -> float:
    """log |d normalised / d `units`| per point [nats]: add n_targets times this to a log-density over
    normalised values to get one over `units` ('era5': Pa, K, m s-1; 'model': kPa, degC, m s-1, which is
    minus `Normalizer.log_std_sum`; 'normalised': 0)."""
    if units == "normalised":
        return 0.0
    if units == "model":
        return -normalizer.log_std_sum
    if units == "era5":
        scale = np.array([BY_NAME[n].scale for n in NAMES]) / np.asarray(normalizer.std)
        return float(np.log(np.abs(scale)).sum())
    raise ValueError(f"units must be 'era5', 'model' or 'normalised', got {units!r}")


def model_units() -> dict[str, str]:
    """{variable: its model unit} (kPa, degC, m/s, m/s)."""
    return {n: BY_NAME[n].model_units for n in NAMES}


@dataclass(frozen=True)
class ModelSpace:
    """Region + normaliser of one model: every conversion between user and model space."""

    region: Region
    normalizer: Normalizer

    # ---- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """{'region': ..., 'normalizer': ...}: the keys a checkpoint stores them under."""
        return {"region": self.region.to_dict(), "normalizer": self.normalizer.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpace":
        """From a `to_dict` or a checkpoint (which holds the same two keys)."""
        return cls(Region.from_dict(d["region"]), Normalizer.from_dict(d["normalizer"]))

    # ---- coordinates ----------------------------------------------------------------------
    def check_points(self, lat: Sequence[float], lon: Sequence[float], where: str = "points") -> None:
        """DomainError saying what is wrong (swapped lat/lon, 0..360 longitudes, outside the disc) unless
        every point lies in the disc the model was trained on (`Region.in_circle`)."""
        region = self.region
        la, lo = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
        ok = region.in_circle(la, lo)
        if ok.all():
            return
        bad = ~ok
        if region.in_circle(lo[bad], la[bad]).all():
            raise DomainError("swapped_coordinates", f"{where}: latitude and longitude look swapped "
                              f"(latitude is degrees north, about {region.centre_lat:g}; longitude degrees east, "
                              f"about {region.centre_lon:g})")
        if (lo[bad] > 180).all() and region.in_circle(la[bad], lo[bad] - 360).all():
            raise DomainError("longitude_0_360", f"{where}: longitudes must be in -180..180 degrees east (got 0..360 values); "
                              "subtract 360 from values above 180")
        i = int(np.flatnonzero(bad)[0])
        raise DomainError("out_of_region", f"{where}: {int(bad.sum())} point(s) lie outside the model's region "
                          f"(within {region.radius_degrees:g} degrees of {region.centre_lat:g} N, "
                          f"{region.centre_lon:g} E), first at index {i}: ({float(la[i]):g}, {float(lo[i]):g})")

    def xy(self, lat: Sequence[float], lon: Sequence[float]) -> np.ndarray:
        """(n,) degrees -> (n, 2) model coordinates (lon, lat order), float32."""
        return self.region.to_model(np.asarray(lon, np.float64), np.asarray(lat, np.float64)).astype(np.float32)

    def circle_targets(self, ctx_lat: Sequence[float], ctx_lon: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) of every circle point not in the context (matched to CIRCLE_MATCH_DECIMALS decimals)."""
        d, r = CIRCLE_MATCH_DECIMALS, self.region
        taken = set(zip(np.round(np.asarray(ctx_lat, np.float64), d).tolist(),
                        np.round(np.asarray(ctx_lon, np.float64), d).tolist()))
        keep = np.array([p not in taken for p in zip(np.round(r.circle_lat, d).tolist(),
                                                     np.round(r.circle_lon, d).tolist())], dtype=bool)
        return r.circle_lat[keep], r.circle_lon[keep]

    # ---- values ---------------------------------------------------------------------------
    @staticmethod
    def check_values(era5: np.ndarray) -> None:
        """DomainError unless every value (n, 4) in ERA5 units is finite and physical."""
        era5 = np.asarray(era5, dtype=np.float64)
        for j, n in enumerate(NAMES):
            check_physical(n, era5[..., j])

    def to_normalised(self, era5: np.ndarray) -> np.ndarray:
        """(n, 4) ERA5 units (Pa, K, m s-1) -> (n, 4) normalised, float32."""
        return self.normalizer.normalize(era5_to_model(era5)).astype(np.float32)

    def to_era5(self, y: np.ndarray) -> np.ndarray:
        """(..., 4) normalised -> (..., 4) ERA5 units, float64."""
        return model_to_era5(self.normalizer.denormalize(y))

    def to_model_units(self, y: np.ndarray) -> np.ndarray:
        """(..., 4) normalised -> (..., 4) model units (kPa, degC, m s-1), float64."""
        return self.normalizer.denormalize(y)

    # ---- densities ------------------------------------------------------------------------
    def log_jacobian(self, units: Units = "era5") -> float:
        """log |d normalised / d `units`| per point [nats] (`log_jacobian` of the normaliser)."""
        return log_jacobian(self.normalizer, units)

    def log_density(self, normalised: Any, n_targets: int, units: Units = "era5") -> Any:
        """A log-density over normalised values (of n_targets points) as one over `units`."""
        return normalised + n_targets * self.log_jacobian(units)
