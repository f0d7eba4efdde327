"""Between the API (ERA5 units, degrees) and the model (normalised values, model coordinates), through
ingest.region, ingest.variables and the checkpoint's Normalizer: this module only calls them.

Region check: a point must lie in the disc the model was trained on (`Region.in_circle`: within
radius * resolution degrees of the centre), the same rule as flownp.api's.
"""

from __future__ import annotations

import numpy as np

from ingest.normalize import Normalizer
from ingest.region import Region
from ingest.variables import BY_NAME, NAMES, era5_to_model, model_to_era5
from service.errors import ApiError


def check_points(region: Region, lat: list[float], lon: list[float], where: str) -> None:
    """Raise 422 with a code saying what is wrong: swapped lat/lon, 0..360 longitudes, or outside."""
    la, lo = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    ok = region.in_circle(la, lo)
    if ok.all():
        return
    bad = ~ok
    deg = region.radius_degrees
    if region.in_circle(lo[bad], la[bad]).all():
        raise ApiError(422, "swapped_coordinates", f"{where}: latitude and longitude look swapped "
                       f"(latitude is degrees north, about {region.centre_lat:g}; longitude degrees east, "
                       f"about {region.centre_lon:g})")
    if (lo[bad] > 180).all() and region.in_circle(la[bad], lo[bad] - 360).all():
        raise ApiError(422, "longitude_0_360", f"{where}: longitudes must be in -180..180 degrees east; "
                       "subtract 360 from values above 180")
    i = int(np.flatnonzero(bad)[0])
    raise ApiError(422, "out_of_region", f"{where}: {int(bad.sum())} point(s) lie outside the model's region "
                   f"(within {deg:g} degrees of {region.centre_lat:g} N, {region.centre_lon:g} E), first at "
                   f"index {i}: ({float(la[i]):g}, {float(lo[i]):g})")


def xy(region: Region, lat: list[float], lon: list[float]) -> np.ndarray:
    """(n,) degrees -> (n, 2) model coordinates (lon, lat order), float32."""
    return region.to_model(np.asarray(lon, np.float64), np.asarray(lat, np.float64)).astype(np.float32)


def era5_to_normalised(values: np.ndarray, normalizer: Normalizer) -> np.ndarray:
    """(n, 4) ERA5 units (Pa, K, m s-1) -> (n, 4) normalised, float32."""
    return normalizer.normalize(era5_to_model(values)).astype(np.float32)


def normalised_to_era5(y: np.ndarray, normalizer: Normalizer) -> np.ndarray:
    """(..., 4) normalised -> (..., 4) ERA5 units, float64."""
    return model_to_era5(normalizer.denormalize(y))


def log_jacobian(normalizer: Normalizer) -> float:
    """log |d normalised / d ERA5 units| per point [nats]: add n_targets times this to a normalised
    log-density to get one over ERA5 units (Pa, K, m s-1)."""
    scale = np.array([BY_NAME[n].scale for n in NAMES]) / np.asarray(normalizer.std)
    return float(np.log(np.abs(scale)).sum())


def circle_targets(region: Region, ctx_lat: list[float], ctx_lon: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of every circle point not in the context (matched to 1e-6 degrees)."""
    key = lambda a, b: set(zip(np.round(a, 6).tolist(), np.round(b, 6).tolist()))  # noqa: E731
    taken = key(np.asarray(ctx_lat, np.float64), np.asarray(ctx_lon, np.float64))
    keep = np.array([p not in taken for p in zip(np.round(region.circle_lat, 6).tolist(),
                                                 np.round(region.circle_lon, 6).tolist())], dtype=bool)
    return region.circle_lat[keep], region.circle_lon[keep]
