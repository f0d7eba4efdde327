"""The one to/from-dict helper of the project's config dataclasses (stored in checkpoints, manifests and
job files as plain dicts)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """Mixin for a dataclass: `to_dict()` (tuples as lists, JSON-friendly) and `from_dict(d)` (lists back to
    tuples, so a frozen config round-trips to an equal one). Keys the
    class does not know are dropped (configs read from older or newer files), or refused when the class
    sets `STRICT_KEYS = True` (configs a user writes by hand)."""

    STRICT_KEYS: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown and cls.STRICT_KEYS:
            raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})
