"""Merge the FlowNP default numbers of the first full run (GP noise floor 1e-6) with the baselines' rerun
(GP noise floor 1e-3 of the context variance) on the SAME frozen splits and sampling seed, and print the
bench's tables. FlowNP and IDW do not depend on the GP; only the GP rows and the ratios change."""
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

here = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("real_era5", here.parent / "real_era5.py")
b = importlib.util.module_from_spec(spec)
sys.modules["real_era5"] = b
spec.loader.exec_module(b)
flow = json.loads((here / "real_era5_before_gp-noise-1e-6.json").read_text())
base = json.loads((here / "real_era5_baselines.json").read_text())
assert flow["manifest"] == base["manifest"], "not the same splits"
out = dict(flow)
out["merged_from"] = ["real_era5_before_gp-noise-1e-6.json (FlowNP default)", "real_era5_baselines.json (IDW, GP)"]
out["methods"] = {**{k: v for k, v in flow["methods"].items() if k.startswith("FlowNP")}, **base["methods"]}
for regime, r in out["regimes"].items():
    br = base["regimes"][regime]
    era5 = {**{k: v for k, v in r["era5"].items() if k.startswith("FlowNP")}, **br["era5"]}
    raw = {**{k: v for k, v in r["evaluate_predictor"].items() if k.startswith("FlowNP")}, **br["evaluate_predictor"]}
    methods = [SimpleNamespace(label=k) for k in era5]
    out["regimes"][regime] = {**r, "era5": era5, "evaluate_predictor": raw, "compare": b.compare(era5, methods)}
(here / "real_era5_before.json").write_text(json.dumps(out, indent=1) + "\n")
from rich.console import Console

b.print_tables(out, Console(width=230))
