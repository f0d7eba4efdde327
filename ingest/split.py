"""The year split (docs/protocol.md §2): for i = 1986, 1990, ..., 2014: train {i, i+1}, valid {i+2}, test {i+3}.

Maps are hourly snapshots; a map belongs to the split of its calendar year (December with its own year).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SplitName = Literal["train", "valid", "test", "unused"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")


def _protocol_years(offset: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(i + o for i in range(1986, 2015, 4) for o in offset))


@dataclass(frozen=True)
class YearSplit:
    """Which calendar years feed which split; every other year is unused."""

    train: tuple[int, ...] = field(default_factory=lambda: _protocol_years((0, 1)))
    valid: tuple[int, ...] = field(default_factory=lambda: _protocol_years((2,)))
    test: tuple[int, ...] = field(default_factory=lambda: _protocol_years((3,)))

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for name in SPLITS:
            for y in getattr(self, name):
                if y in seen:
                    raise ValueError(f"year {y} is in both {seen[y]} and {name}")
                seen[y] = name

    def of(self, year: int) -> SplitName:
        """The split of a calendar year."""
        for name in SPLITS:
            if int(year) in getattr(self, name):
                return name  # type: ignore[return-value]
        return "unused"

    def to_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name)) for name in SPLITS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "YearSplit":
        return cls(**{name: tuple(int(y) for y in d[name]) for name in SPLITS})


PROTOCOL_SPLIT = YearSplit()
