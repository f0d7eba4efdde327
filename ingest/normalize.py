"""Normalisation between model physical units (kPa, degC, m/s) and normalised model space.

`normalised = (physical - mean) / std`, per variable, with the method stored per variable:
- "standard": mean and std of the variable over the train years (surface pressure, temperature);
- "scale":    mean 0 and std = mean 10 m wind speed over the train years (u10, v10: winds are scaled,
              not centred; docs/protocol.md §4).
Statistics are accumulated exactly in float64 (shifted sums) so stores can be built incrementally.
A log-density in normalised units converts to physical units by subtracting sum(log std) per point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ingest.variables import NAMES

Method = Literal["standard", "scale"]

REFERENCE_MEAN = (100.1209, 7.4628, 0.0, 0.0)
REFERENCE_STD = (1.4738, 8.5286, 3.4162, 3.4162)
DEFAULT_METHODS: tuple[Method, ...] = ("standard", "standard", "scale", "scale")
_SHIFT = np.array(REFERENCE_MEAN)  # shift for numerically safe sums


@dataclass(frozen=True)
class Normalizer:
    """Per-variable affine normalisation in model order (sp, t2m, u10, v10)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    methods: tuple[str, ...] = DEFAULT_METHODS
    variables: tuple[str, ...] = NAMES
    source: str = "reference"

    def __post_init__(self) -> None:
        n = len(self.variables)
        if not (len(self.mean) == len(self.std) == len(self.methods) == n):
            raise ValueError("mean, std, methods and variables must have the same length")
        if not all(np.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"std must be finite and positive, got {self.std}")
        for m, mu in zip(self.methods, self.mean):
            if m not in ("standard", "scale"):
                raise ValueError(f"unknown normalisation method {m!r}")
            if m == "scale" and mu != 0.0:
                raise ValueError("method 'scale' requires mean 0")

    @classmethod
    def reference(cls) -> "Normalizer":
        """The constants hard-coded in the earlier public code (for parity with published numbers)."""
        return cls(REFERENCE_MEAN, REFERENCE_STD, DEFAULT_METHODS, NAMES, "reference")

    @property
    def log_std_sum(self) -> float:
        """sum(log std) over variables [nats per point]: normalised log p - this = physical log p."""
        return float(np.sum(np.log(self.std)))

    def normalize(self, physical: np.ndarray) -> np.ndarray:
        """(..., V) physical (kPa, degC, m/s) -> (..., V) normalised, float64."""
        x = np.asarray(physical, dtype=np.float64)
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def denormalize(self, normalised: np.ndarray) -> np.ndarray:
        """(..., V) normalised -> (..., V) physical (kPa, degC, m/s), float64."""
        z = np.asarray(normalised, dtype=np.float64)
        return z * np.asarray(self.std) + np.asarray(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variables": list(self.variables), "mean": list(self.mean), "std": list(self.std),
            "methods": list(self.methods), "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalizer":
        return cls(
            tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]),
            tuple(d["methods"]), tuple(d["variables"]), str(d.get("source", "unknown")),
        )


@dataclass
class StatsAccumulator:
    """Exact, mergeable sufficient statistics of (N, 4) physical values in model order."""

    count: int = 0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(4))
    sumsq: np.ndarray = field(default_factory=lambda: np.zeros(4))
    speed_sum: float = 0.0

    def update(self, values: np.ndarray) -> "StatsAccumulator":
        """Add (..., 4) physical values (kPa, degC, u, v)."""
        v = np.asarray(values).reshape(-1, 4)
        return self.update_columns([v[:, k] for k in range(4)])

    def update_columns(self, columns: list[np.ndarray]) -> "StatsAccumulator":
        """Add values given as 4 arrays of equal size (one per variable, model order): the fast path.
        Sums and sums of squares of the shifted values accumulate in float64; the wind speed is formed
        in the input precision and summed in float64."""
        cols = [np.asarray(c).ravel() for c in columns]
        self.count += cols[0].size
        sums, sumsq = np.empty(4), np.empty(4)
        for k, (c, s) in enumerate(zip(cols, _SHIFT)):
            d = c.astype(np.float64) - s
            sums[k], sumsq[k] = d.sum(), np.dot(d, d)
        self.sum = self.sum + sums
        self.sumsq = self.sumsq + sumsq
        self.speed_sum += float(np.hypot(cols[2], cols[3]).sum(dtype=np.float64))
        return self

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        return StatsAccumulator(
            self.count + other.count, self.sum + other.sum, self.sumsq + other.sumsq,
            self.speed_sum + other.speed_sum,
        )

    @property
    def mean(self) -> np.ndarray:
        return _SHIFT + self.sum / self.count

    @property
    def std(self) -> np.ndarray:
        m = self.sum / self.count
        return np.sqrt(np.maximum(self.sumsq / self.count - m * m, 0.0))

    @property
    def mean_speed(self) -> float:
        return self.speed_sum / self.count

    def normalizer(self, source: str = "train") -> Normalizer:
        """The protocol's normaliser from these statistics (standard for sp/t2m, scale for winds)."""
        if self.count == 0:
            raise ValueError("no values to compute statistics from (are there any train-year maps?)")
        mean = [float(self.mean[0]), float(self.mean[1]), 0.0, 0.0]
        std = [float(self.std[0]), float(self.std[1]), self.mean_speed, self.mean_speed]
        return Normalizer(tuple(mean), tuple(std), DEFAULT_METHODS, NAMES, source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist(),
            "speed_sum": self.speed_sum, "shift": _SHIFT.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StatsAccumulator":
        if not np.allclose(d.get("shift", _SHIFT), _SHIFT):
            raise ValueError("statistics were accumulated with a different shift")
        return cls(int(d["count"]), np.asarray(d["sum"], float), np.asarray(d["sumsq"], float),
                   float(d["speed_sum"]))


def quantize_float16(physical: np.ndarray) -> np.ndarray:
    """Parity option: round physical values (kPa, degC, m/s) to float16 as the earlier pipeline stored
    them (surface pressure steps of 62.5 Pa). Off by default; every number must say if it was used."""
    return np.asarray(physical).astype(np.float16).astype(np.float32)
