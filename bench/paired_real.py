"""Paired real-map comparison of two bench/real_era5.py --json outputs run on the same frozen splits: the
per-split log-likelihood difference A - B (nats per target point over ERA5 units) per regime, with the standard
error of the paired differences, and both models' RMSE / CRPS / 90% coverage side by side. ONE map.

    python bench/paired_real.py NEW.json OLD.json [--labels new,old]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_table import _fmt_paired, _per_split, paired_difference  # noqa: E402

VARS = ("sp", "t2m", "u10", "v10")


def _row(r: dict[str, Any], regime: str) -> dict[str, Any] | None:
    ms = list(r.get("regimes", {}).get(regime, {}).get("era5", {}).values())
    return ms[0] if ms else None


def table(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    """Markdown lines: one row per (regime, model) and the paired difference per regime."""
    lines = ["| regime | model | RMSE sp / t2m / u10 / v10 | CRPS sp | cov90 sp / t2m / u10 / v10 | log-lik | "
             f"paired {labels[0]} - {labels[1]} |", "|---|---|---|---|---|---|---|"]
    for regime in ("dense", "sparse"):
        pair = _fmt_paired(paired_difference(_per_split(a, regime), _per_split(b, regime)))
        for label, r in zip(labels, (a, b)):
            m = _row(r, regime)
            if m is None:
                continue
            g = lambda key: m.get(key) or {}  # noqa: E731
            rmse = " / ".join(f"{g('rmse').get(v, float('nan')):.4g}" for v in VARS)
            cov = " / ".join(f"{g('cov90').get(v, float('nan')):.3f}" for v in VARS)
            crps = g("crps").get("sp", float("nan"))
            ll = m.get("log_lik")
            lines.append(f"| {regime} | {label} | {rmse} | {crps:.4g} | {cov} | "
                         f"{'' if ll is None else f'{ll:.3f}'} | {pair if label == labels[0] else ''} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="bench/real_era5.py --json of model A")
    p.add_argument("b", type=Path, help="the same for model B, on the same splits")
    p.add_argument("--labels", default="A,B", help="two names, comma-separated")
    args = p.parse_args(argv)
    labels = tuple(args.labels.split(","))
    if len(labels) != 2:
        p.error("--labels takes two names, e.g. new,old")
    print("\n".join(table(json.loads(args.a.read_text()), json.loads(args.b.read_text()), labels)))


if __name__ == "__main__":
    main()
