"""The Memphis region: the 41x41 0.25-degree grid, its 1245-point circle and model coordinates.

Conventions (docs/protocol.md §3):
- grid index (i_lat, i_lon), latitudes ascending (i_lat = 0 is the southern edge, 30 N), longitudes
  ascending in -180..180 (i_lon = 0 is 96 W);
- the circle holds the points whose index distance from the centre index (20, 20) is < 20, in
  row-major order over (i_lat, i_lon): point p of every store, task and checkpoint means the same place;
- model coordinates x = 2 * (degrees - centre) in the order (longitude, latitude): radius 10, spacing 0.5.
On the grid every conversion here is exact in binary floating point (multiples of 0.25).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Region:
    """A square grid of `size` x `size` points at `resolution` degrees around (centre_lon, centre_lat)."""

    name: str = "memphis"
    centre_lon: float = -91.0
    centre_lat: float = 35.0
    resolution: float = 0.25
    size: int = 41
    circle_radius_index: int = 20
    coordinate_scale: float = 2.0

    # ---- grid ---------------------------------------------------------------------------------
    @property
    def half(self) -> int:
        return (self.size - 1) // 2

    @cached_property
    def lats(self) -> np.ndarray:
        """(size,) latitudes in degrees north, ascending."""
        return self.centre_lat + self.resolution * (np.arange(self.size) - self.half)

    @cached_property
    def lons(self) -> np.ndarray:
        """(size,) longitudes in degrees east (-180..180), ascending."""
        return self.centre_lon + self.resolution * (np.arange(self.size) - self.half)

    @property
    def bounds(self) -> dict[str, float]:
        """North, west, south, east edges in degrees (the CDS `area` order is N, W, S, E)."""
        return {
            "north": float(self.lats[-1]), "west": float(self.lons[0]),
            "south": float(self.lats[0]), "east": float(self.lons[-1]),
        }

    @property
    def cds_area(self) -> list[float]:
        b = self.bounds
        return [b["north"], b["west"], b["south"], b["east"]]

    # ---- circle -------------------------------------------------------------------------------
    @cached_property
    def circle_mask(self) -> np.ndarray:
        """(size, size) bool over (i_lat, i_lon): index distance from the centre < radius."""
        i = np.arange(self.size) - self.half
        d2 = i[:, None] ** 2 + i[None, :] ** 2
        return d2 < self.circle_radius_index**2

    @cached_property
    def circle_index(self) -> np.ndarray:
        """(P, 2) int (i_lat, i_lon) of the circle points, row-major."""
        return np.argwhere(self.circle_mask)

    @property
    def n_points(self) -> int:
        return int(self.circle_mask.sum())

    @property
    def radius_degrees(self) -> float:
        """Radius of the trained disc in degrees (5.0 for Memphis)."""
        return self.circle_radius_index * self.resolution

    def in_circle(self, lat: np.ndarray, lon: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        """Which points (degrees north / east, any shape) lie in the open disc the model was trained on:
        strictly closer than `radius_degrees` to the centre, less `tol` degrees so that a point on the edge
        given with float rounding (e.g. 40.0 as 39.9999999) is outside too. The one region rule of the
        service and the Python API: on the grid, exactly the `n_points` circle points are inside (index
        distance < radius), not the points at index distance exactly the radius ((0, 20), (12, 16), ...);
        off-grid points inside the disc are accepted too. `tol` must stay well below the gap between the
        disc's edge and its outermost grid point (0.019 degrees for Memphis, index distance sqrt(397))."""
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        return np.hypot(lon - self.centre_lon, lat - self.centre_lat) < self.radius_degrees - tol

    @cached_property
    def circle_lat(self) -> np.ndarray:
        """(P,) latitude of each circle point, degrees north."""
        return self.lats[self.circle_index[:, 0]]

    @cached_property
    def circle_lon(self) -> np.ndarray:
        """(P,) longitude of each circle point, degrees east."""
        return self.lons[self.circle_index[:, 1]]

    @cached_property
    def circle_xy(self) -> np.ndarray:
        """(P, 2) model coordinates (x_lon, x_lat) of the circle points."""
        return self.to_model(self.circle_lon, self.circle_lat)

    # ---- coordinates --------------------------------------------------------------------------
    def to_model(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Degrees (lon, lat), any shape S -> model coordinates, shape S + (2,), order (lon, lat)."""
        lon = np.asarray(lon, dtype=np.float64)
        lat = np.asarray(lat, dtype=np.float64)
        return np.stack(
            [self.coordinate_scale * (lon - self.centre_lon),
             self.coordinate_scale * (lat - self.centre_lat)], axis=-1,
        )

    def from_model(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model coordinates (..., 2) in order (lon, lat) -> (lon, lat) in degrees."""
        xy = np.asarray(xy, dtype=np.float64)
        return (xy[..., 0] / self.coordinate_scale + self.centre_lon,
                xy[..., 1] / self.coordinate_scale + self.centre_lat)

    def grid_index(self, lon: np.ndarray, lat: np.ndarray, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
        """Degrees -> (i_lat, i_lon) integer grid indices. Raises ValueError for points that are off
        the grid by more than `tol` degrees or outside the region (no silent snapping of far points)."""
        lon = np.asarray(lon, dtype=np.float64)
        lat = np.asarray(lat, dtype=np.float64)
        fi_lat = (lat - self.lats[0]) / self.resolution
        fi_lon = (lon - self.lons[0]) / self.resolution
        i_lat = np.rint(fi_lat).astype(np.int64)
        i_lon = np.rint(fi_lon).astype(np.int64)
        off = np.maximum(np.abs(fi_lat - i_lat), np.abs(fi_lon - i_lon)) * self.resolution
        if np.any(off > tol):
            raise ValueError(f"{int((off > tol).sum())} point(s) are not on the {self.resolution}-degree grid")
        outside = (i_lat < 0) | (i_lat >= self.size) | (i_lon < 0) | (i_lon >= self.size)
        if np.any(outside):
            raise ValueError(f"{int(outside.sum())} point(s) lie outside the {self.name} region {self.bounds}")
        return i_lat, i_lon

    def point_index(self, lon: np.ndarray, lat: np.ndarray, tol: float = 1e-4) -> np.ndarray:
        """Degrees -> circle point index p (..., int). Raises ValueError for points not in the circle."""
        i_lat, i_lon = self.grid_index(lon, lat, tol)
        lookup = np.full((self.size, self.size), -1, dtype=np.int64)
        lookup[self.circle_index[:, 0], self.circle_index[:, 1]] = np.arange(self.n_points)
        p = lookup[i_lat, i_lon]
        if np.any(p < 0):
            raise ValueError(f"{int((p < 0).sum())} point(s) lie outside the {self.n_points}-point circle")
        return p

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Region":
        return cls(**d)


MEMPHIS = Region()
