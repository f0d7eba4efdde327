"""Summarise bench/finetune_control.sh as a markdown table: one row per base and variant (mean and
(min..max) over seeds), every fine-tune paired with its control after checking that both started from the
same weights and ran the same steps and tasks (`check_same_start`; a mismatch stops the table).

    python bench/finetune_control_table.py /tmp/ftctl
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_table import cell  # noqa: E402  (mean and (min..max) over seeds)
from flownp.checkpoint import load_checkpoint  # noqa: E402
from flownp.jobs.finetune import check_same_start  # noqa: E402

ORDER = ["base", "mle", "ctl-mle", "gav-mlp", "ctl-gav-mlp", "gav-local", "ctl-gav-local"]
LABEL = {"base": "FlowNP (pretrained)", "mle": "FT-FlowNP (MLE, inversion)",
         "ctl-mle": "control: continued pretraining (FM, whole net)", "gav-mlp": "GAV (Schur, MLP centre)",
         "ctl-gav-mlp": "control: FM of the same residual (MLP centre)", "gav-local": "GAV (Schur, local centre)",
         "ctl-gav-local": "control: FM of the same residual (local centre)"}
COLS = [("ll100", ".3f"), ("ll16", ".3f"), ("d_ll100", "+.3f"), ("d_ll16", "+.3f"), ("gauss50", ".3f"),
        ("crps_t2m", ".3f"), ("rmse_t2m", ".3f"), ("cov90_t2m", ".2f")]


def metrics(r: dict, base: dict | None) -> dict[str, float]:
    f, by = r["flownp"], r["tar_ll_by_solver"]
    out = {"ll100": by["midpoint:100"]["tar_ll"], "ll16": by["euler:16"]["tar_ll"], "gauss50": f["gauss_ll"],
           "crps_t2m": f["crps"]["t2m"], "rmse_t2m": f["rmse"]["t2m"], "cov90_t2m": f["coverage90"]["t2m"]}
    if base is not None:  # paired with the base on the same tasks and probes
        out["d_ll100"] = out["ll100"] - base["tar_ll_by_solver"]["midpoint:100"]["tar_ll"]
        out["d_ll16"] = out["ll16"] - base["tar_ll_by_solver"]["euler:16"]["tar_ll"]
    return out


def main(work: str) -> None:
    w = Path(work)
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    oracle: dict[str, dict] = {}
    checked = 0
    for p in sorted((w / "results").glob("*.json")):
        m = re.match(r"(?:(\w+?)-)?(base|(?:ctl-)?(?:mle|gav-mlp|gav-local))(?:-s(\d+))?$", p.stem)
        if not m:
            continue
        tag = m[1] or "pre"
        r = json.loads(p.read_text())
        base_json = w / "results" / (f"{m[1]}-base.json" if m[1] else "base.json")
        base = json.loads(base_json.read_text()) if m[2] != "base" and base_json.exists() else None
        rows[(tag, m[2])].append(metrics(r, base))
        oracle[tag] = r["oracle"]
        if m[2].startswith("ctl-"):  # the control and its fine-tune: the same start, steps and tasks
            run = lambda v: w / (f"ft-{m[1]}-{v}-s{m[3]}" if m[1] else f"ft-{v}-s{m[3]}") / "last.pt"  # noqa: E731
            if run(m[2][4:]).exists():
                check_same_start(load_checkpoint(run(m[2][4:])), load_checkpoint(run(m[2])))
                checked += 1
    print("| base | model | seeds | tar_ll mid100 | tar_ll euler16 | d mid100 | d euler16 | gauss50 | crps_t2m "
          "| rmse_t2m | cov90_t2m |")
    print("|---|---|---|" + "---|" * len(COLS))
    for tag in sorted({t for t, _ in rows}):
        for v in ORDER:
            rs = rows.get((tag, v))
            if rs:
                vals = [cell([r[c] for r in rs if c in r], f) for c, f in COLS]
                print(f"| {tag} | {LABEL[v]} | {len(rs)} | " + " | ".join(vals) + " |")
        o = oracle[tag]
        print(f"| {tag} | oracle (exact) | | {o['tar_ll']:.3f} | | | | {o['gauss_ll']:.3f} | {o['crps']['t2m']:.3f} "
              f"| {o['rmse']['t2m']:.3f} | {o['coverage90']['t2m']:.2f} |")
    print(f"\n{checked} control(s) checked against their fine-tune's start (start_base_sha256, start_sha256, "
          "steps, batch, task stream).")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ftctl")
