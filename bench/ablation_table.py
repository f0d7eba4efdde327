"""Prints the equal-compute ablation's tables (docs/results.md §5.5) from bench/ablation_study.sh's results:

    python bench/ablation_table.py WORK_DIR/results

Synthetic rows: the GP law's frozen sets, tar_ll in the checkpoint's normalised units and its gap to the exact
oracle (nats per target point); real rows: ONE real ERA5 map, the first frozen splits of bench/real_era5.py,
RMSE in ERA5 units (Pa, K, m/s), log-likelihood in nats per target point over ERA5 units.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

ROWS = (("ref", "reference (N(0, I) base, no standardisation)"),
        ("std", "+ per-task standardisation"),
        ("gp0", "GP base alone (untrained residual: zero flow)"),
        ("gp", "+ GP base, residual velocity"),
        ("broad", "+ broad prior (independent targets)"),
        ("silu", "+ broad prior, SiLU head"),
        ("silu2", "same, 500 more steps (cosine restarted at 5e-4)"),
        ("joint", "broad prior, joint targets"),
        ("jsilu", "broad prior, SiLU head, joint targets"),
        ("pw", "broad prior, SiLU, arch pointwise (value and time in the head)"),
        ("pwn", "same, the head attending to 16 nearest context points"),
        ("pwv", "pointwise, the last block seeing the value (value_layers 1)"),
        ("pwvk4", "same, 4 path draws per target and step"))
# (row, against): paired real-map log-likelihood differences
PAIRS = (("jsilu", "silu"), ("pw", "silu"), ("pwn", "silu"), ("pwn", "pw"), ("pwv", "silu"), ("pwv", "pw"),
         ("pwvk4", "pwv"))
VARS = ("sp", "t2m", "u10", "v10")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def _wall(out: Path) -> str:
    """Training wall time from `/usr/bin/time -f '%e s wall'` in the train log ('' when absent)."""
    if not out.is_file():
        return ""
    m = re.findall(r"([\d.]+) s wall", out.read_text())
    return f"{float(m[-1]) / 60:.0f}" if m else ""


def _steps(run: Path) -> str:
    """The last optimiser step in a run's log ('' when absent)."""
    log = run / "log.jsonl"
    if not log.is_file():
        return ""
    steps = [json.loads(line).get("step") for line in log.read_text().splitlines() if line.strip()]
    return str(max((s for s in steps if s is not None), default=""))


def _fmt(x: float | None, nd: int = 3) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def synthetic_table(res: Path) -> list[str]:
    """Gaps to the oracle (each checkpoint's tar_ll is in its own normalised units; the gap is not) and the
    sample-mean RMSE in model units (kPa, degC, m/s)."""
    lines = ["| model | steps | train min | gap to oracle, dense | sparse | RMSE dense sp / t2m / u10 / v10 | RMSE sparse t2m |",
             "|---|---|---|---|---|---|---|"]
    oracle: dict[str, Any] = {}
    base: dict[str, dict[str, Any]] = {}

    def rmse4(r: dict[str, Any] | None) -> str:
        return " / ".join(_fmt(r["rmse"][v], 4 if v == "sp" else 3) for v in VARS) if r else ""

    for name, label in ROWS:
        d, s = _load(res / f"{name}-syn-dense.json"), _load(res / f"{name}-syn-sparse.json")
        if d is None and s is None:
            continue
        for regime, r in (("dense", d), ("sparse", s)):
            if r:
                oracle.setdefault(regime, r.get("oracle"))
                for k in ("idw", "gp"):
                    if k in r:
                        base.setdefault(k, {})[regime] = r[k]
        lines.append("| " + " | ".join([label, _steps(res.parent / f"run-{name}"), _wall(res.parent / f"train-{name}.out"),
                                        _fmt(d.get("gap_to_oracle")) if d else "",
                                        _fmt(s.get("gap_to_oracle")) if s else "",
                                        rmse4(d["flownp"] if d else None),
                                        _fmt(s["flownp"]["rmse"]["t2m"]) if s else ""]) + " |")
    for k, label in (("idw", "IDW"), ("gp", "fitted GP")):
        if k in base:
            b = base[k]
            gaps = [_fmt(oracle[g]["tar_ll"] - b[g]["tar_ll"]) if g in b and oracle.get(g) else "" for g in ("dense", "sparse")]
            lines.append("| " + " | ".join([label, "", "", *gaps, rmse4(b.get("dense")),
                                            _fmt(b["sparse"]["rmse"]["t2m"]) if "sparse" in b else ""]) + " |")
    if oracle.get("dense"):
        lines.append("| oracle | | | 0 | 0 | " + rmse4(oracle["dense"]) + " | "
                     + (_fmt(oracle["sparse"]["rmse"]["t2m"]) if oracle.get("sparse") else "") + " |")
    return lines


def real_table(res: Path, regime: str) -> list[str]:
    lines = [f"| model ({regime}) | RMSE sp | t2m | u10 | v10 | cov90 sp / t2m / u / v | log-lik |",
             "|---|---|---|---|---|---|---|"]

    def row(label: str, m: dict[str, Any]) -> str:
        ll = m.get("log_lik")
        return ("| " + label + " | " + " | ".join(_fmt(m["rmse"][v], 1 if v == "sp" else 3) for v in VARS)
                + " | " + " ".join(_fmt(m["cov90"][v], 2) for v in VARS) + " | "
                + (f"{ll:.3f} ± {m['log_lik_stderr']:.3f}" if ll is not None else "") + " |")

    for name, label in ROWS:
        r = _load(res / f"{name}-real-{regime}.json")
        if r:
            for m in r["regimes"][regime]["era5"].values():
                lines.append(row(label, m))
    b = _load(res / f"baselines-real-{regime}.json")
    if b:
        for key, m in b["regimes"][regime]["era5"].items():
            lines.append(row(key, m))
    return lines


def _per_split(r: dict[str, Any] | None, regime: str) -> list[float] | None:
    if not r:
        return None
    ms = list(r.get("regimes", {}).get(regime, {}).get("era5", {}).values())
    return ms[0].get("log_lik_per_split") if ms else None


def paired_difference(pa: list[float] | None, pb: list[float] | None) -> tuple[float, float, int] | None:
    """(mean, standard error, n) of the per-split differences pa - pb (same splits, same order); None unless
    both have the same n >= 2 splits."""
    if not pa or not pb or len(pa) != len(pb) or len(pa) < 2:
        return None
    d = [x - y for x, y in zip(pa, pb)]
    mean = sum(d) / len(d)
    return mean, (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5, len(d)


def _fmt_paired(p: tuple[float, float, int] | None) -> str:
    return "" if p is None else f"{p[0]:+.4f} ± {p[1]:.4f} ({p[2]})"


def paired_table(res: Path) -> list[str]:
    """Real-map log-likelihood differences on the same splits (row - against), nats per target point, with
    the standard error of the paired differences: far smaller than either row's spread across splits."""
    lines = ["| row - against | dense: mean ± s.e. (splits) | sparse: mean ± s.e. (splits) |", "|---|---|---|"]
    for a, b in PAIRS:
        cells = []
        for regime in ("dense", "sparse"):
            pa = _per_split(_load(res / f"{a}-real-{regime}.json"), regime)
            pb = _per_split(_load(res / f"{b}-real-{regime}.json"), regime)
            cells.append(_fmt_paired(paired_difference(pa, pb)))
        if any(cells):
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    a = p.parse_args()
    print("Synthetic GP law (16 dense / 8 sparse frozen tasks):\n")
    print("\n".join(synthetic_table(a.results)))
    for regime in ("dense", "sparse"):
        print(f"\nReal ERA5 map, {regime}:\n")
        print("\n".join(real_table(a.results, regime)))
    print("\nPaired real-map log-likelihood differences (same splits):\n")
    print("\n".join(paired_table(a.results)))


if __name__ == "__main__":
    main()
