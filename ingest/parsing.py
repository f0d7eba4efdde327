"""Command-line and config values, parsed in one place: `MIN-MAX` ranges, integer lists ('1986-2017',
'1990,1991', '00:00,12:00') and the valid times of (years, months, days, hours) selections."""

from __future__ import annotations

import calendar
import re
from datetime import datetime
from typing import Iterable


def parse_range(spec: str) -> tuple[int, int]:
    """'50-1000' -> (50, 1000); '60' -> (60, 60)."""
    lo, _, hi = str(spec).partition("-")
    return int(lo), int(hi or lo)


def format_range(lo: int, hi: int) -> str:
    """(50, 1000) -> '50-1000' (what `parse_range` reads back)."""
    return f"{lo}-{hi}"


def parse_int_list(text: str, *, name: str = "value") -> tuple[int, ...]:
    """'1986-2017', '1990,1991', '0-23', '00:00,12:00' or a mix -> sorted unique ints. Raises ValueError."""
    out: set[int] = set()
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        m = re.fullmatch(r"(\d+)(?::00)?\s*(?:-\s*(\d+)(?::00)?)?", token)
        if m is None:
            raise ValueError(f"cannot read {name} {token!r} (use e.g. '1986-2017' or '1990,1991')")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"empty {name} range {token!r}")
        out.update(range(lo, hi + 1))
    if not out:
        raise ValueError(f"no {name} given")
    return tuple(sorted(out))


def valid_times(years: Iterable[int], months: Iterable[int], days: Iterable[int] | None,
                hours: Iterable[int]) -> list[datetime]:
    """Every (year, month, day, hour) that exists, increasing: days a month lacks (Feb 30) are skipped,
    `days=None` is every day of the month. Naive datetimes, UTC by convention."""
    hs = sorted({int(h) for h in hours})
    out = []
    for y in sorted({int(v) for v in years}):
        for m in sorted({int(v) for v in months}):
            last = calendar.monthrange(y, m)[1]
            for d in range(1, last + 1) if days is None else sorted({int(v) for v in days}):
                if d <= last:
                    out.extend(datetime(y, m, d, h) for h in hs)
    return out
