"""Summarise the fine-tuning study (bench/finetune_study.sh) as a markdown table: one row per base and
variant, mean and spread (min..max) over seeds. Run: python bench/finetune_table.py /tmp/study/ft-results
(or docs/runs/finetune-study, where the results and the runs' logs are kept)
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ORDER = ["base", "mle-inv", "mle-rand", "gav", "gav-contr", "gav-mlp", "gav-lowlr"]
LABEL = {"base": "FlowNP (pretrained)", "mle-inv": "FT-FlowNP (MLE, inversion)", "mle-rand": "FT (MLE, random pairs)",
         "gav": "FT-FlowNP (GAV, Schur)", "gav-contr": "FT (GAV, contracting)", "gav-mlp": "FT (MLP residual)",
         "gav-lowlr": "FT (GAV, Schur, lr 5e-5)"}


def metrics(r: dict) -> dict[str, float]:
    f, rob, sw = r["flownp"], r.get("robustness", {}), r.get("steps_sweep", {}).get("rmse_to_reference", {})
    out = {"tar_ll": f["tar_ll"], "gap": r["oracle"]["tar_ll"] - f["tar_ll"], "rmse_t2m": f["rmse"]["t2m"],
           "crps_t2m": f["crps"]["t2m"], "cov90_t2m": f["coverage90"]["t2m"]}
    for spec, key in (("gaussian:0.1", "drop_gauss"), ("salt-pepper:0.05", "drop_sp")):
        if spec in rob:
            out[key] = rob[spec]["tar_ll_drop"]
    for k in ("1", "4", "16"):
        if k in sw:
            out[f"euler{k}_t2m"] = sw[k]["t2m"]
    return out


def recon_mse(log: Path) -> float | None:
    """The K-step reconstruction MSE (normalised units) implied by a fine-tuning run's last validation NLL,
    when sigma is one fixed value: NLL = 0.5 mse / sigma^2 + log sigma + 0.5 log(2 pi) per element."""
    if not log.exists():
        return None
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    val = [r["val_loss_ema"] for r in rows if "val_loss_ema" in r]
    sig = [r["sigma"] for r in rows if "sigma" in r]
    if not val or not sig or len(set(sig[-1])) != 1 or any(r.get("cfm", 0.0) for r in rows if "cfm" in r):
        return None
    s = sig[-1][0]
    return 2 * s * s * (val[-1] - np.log(s) - 0.5 * np.log(2 * np.pi))


def cell(xs: list[float], fmt: str) -> str:
    if not xs:
        return ""
    m = format(float(np.mean(xs)), fmt)
    return m if len(xs) == 1 else f"{m} ({format(min(xs), fmt)}..{format(max(xs), fmt)})"


def main(folder: str) -> None:
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    oracle = {}
    for p in sorted(Path(folder).glob("*.json")):
        m = re.match(r"(\w+?)-(base|mle-inv|mle-rand|gav-contr|gav-mlp|gav-lowlr|gav)(?:-s(\d+))?$", p.stem)
        if not m:
            continue
        r = json.loads(p.read_text())
        row = metrics(r)
        if m[2] not in ("base", "mle-rand"):  # inversion-coupled runs: a reconstruction of the data itself
            run = f"ft-{m[1]}-{m[2]}-s{m[3]}"  # the study's run folder, or its log kept beside the results
            log = Path(folder).parent / run / "log.jsonl"
            mse = recon_mse(log if log.exists() else Path(folder) / f"train-{run}.jsonl")
            if mse is not None:
                row["val_recon_mse"] = mse
        rows[(m[1], m[2])].append(row)
        oracle[m[1]] = r["oracle"]["tar_ll"]
    cols = [("tar_ll", ".3f"), ("gap", ".2f"), ("rmse_t2m", ".3f"), ("crps_t2m", ".3f"), ("cov90_t2m", ".2f"),
            ("drop_gauss", ".3f"), ("drop_sp", ".3f"), ("euler1_t2m", ".3f"), ("euler4_t2m", ".3f"),
            ("euler16_t2m", ".4f"), ("val_recon_mse", ".1e")]
    print("| base | model | seeds | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for base in sorted({b for b, _ in rows}, key=lambda b: b != "joint"):
        for v in ORDER:
            rs = rows.get((base, v))
            if rs:
                vals = [cell([r[c] for r in rs if c in r], f) for c, f in cols]
                print(f"| {base} | {LABEL[v]} | {len(rs)} | " + " | ".join(vals) + " |")
        print(f"| {base} | oracle | | {oracle[base]:.3f} |" + " |" * (len(cols) - 1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/study/ft-results")
