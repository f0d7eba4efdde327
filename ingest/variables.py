"""The four ERA5 variables: names, aliases, units and the one conversion ERA5 units <-> model units.

Model order and units (docs/protocol.md §4): surface pressure [kPa], 2 m temperature [degC], 10 m u wind
(eastward) [m/s], 10 m v wind (northward) [m/s]. Variables are always selected by name, never by
position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Variable:
    """One variable: `model = era5 * scale + offset`; `plausible` is a range in model units."""

    name: str
    cds_name: str
    long_name: str
    standard_name: str
    era5_units: str
    model_units: str
    scale: float
    offset: float
    plausible: tuple[float, float]
    aliases: tuple[str, ...]

    def era5_to_model(self, values: np.ndarray) -> np.ndarray:
        """ERA5 units (Pa, K, m/s) -> model units (kPa, degC, m/s)."""
        return values * self.scale + self.offset

    def model_to_era5(self, values: np.ndarray) -> np.ndarray:
        """Model units (kPa, degC, m/s) -> ERA5 units (Pa, K, m/s)."""
        return (values - self.offset) / self.scale


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "sp", "surface_pressure", "Surface pressure", "surface_air_pressure", "Pa", "kPa",
        1e-3, 0.0, (40.0, 115.0), ("surface_pressure", "sp", "SP", "var134"),
    ),
    Variable(
        "t2m", "2m_temperature", "2 metre temperature", "air_temperature", "K", "degC",
        1.0, -273.15, (-90.0, 65.0), ("2m_temperature", "t2m", "2t", "T2M", "VAR_2T", "var167"),
    ),
    Variable(
        "u10", "10m_u_component_of_wind", "10 metre U wind component", "eastward_wind", "m s-1",
        "m/s", 1.0, 0.0, (-120.0, 120.0),
        ("10m_u_component_of_wind", "u10", "10u", "U10", "VAR_10U", "var165"),
    ),
    Variable(
        "v10", "10m_v_component_of_wind", "10 metre V wind component", "northward_wind", "m s-1",
        "m/s", 1.0, 0.0, (-120.0, 120.0),
        ("10m_v_component_of_wind", "v10", "10v", "V10", "VAR_10V", "var166"),
    ),
)

NAMES: tuple[str, ...] = tuple(v.name for v in VARIABLES)
BY_NAME: dict[str, Variable] = {v.name: v for v in VARIABLES}
CDS_NAMES: tuple[str, ...] = tuple(v.cds_name for v in VARIABLES)


def resolve_alias(name: str) -> str | None:
    """Canonical short name for any known alias (case-sensitive first, then case-insensitive)."""
    for v in VARIABLES:
        if name in v.aliases:
            return v.name
    low = name.lower()
    for v in VARIABLES:
        if low in (a.lower() for a in v.aliases):
            return v.name
    return None


def era5_to_model(values: np.ndarray) -> np.ndarray:
    """(..., 4) array in ERA5 units, model order -> model units (float64 arithmetic)."""
    values = np.asarray(values, dtype=np.float64)
    scale = np.array([v.scale for v in VARIABLES])
    offset = np.array([v.offset for v in VARIABLES])
    return values * scale + offset


def model_to_era5(values: np.ndarray) -> np.ndarray:
    """(..., 4) array in model units, model order -> ERA5 units (float64 arithmetic)."""
    values = np.asarray(values, dtype=np.float64)
    scale = np.array([v.scale for v in VARIABLES])
    offset = np.array([v.offset for v in VARIABLES])
    return (values - offset) / scale
