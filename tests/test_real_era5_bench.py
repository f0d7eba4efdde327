"""The real-ERA5 benchmark (bench/real_era5.py) end to end in --quick mode: IDW, the fitted GP and a tiny
untrained FlowNP checkpoint on the first 2 frozen splits of each regime; the JSON's structure, the GP
beating IDW on the dense regime (true on this smooth real map), the committed manifest naming the same
splits, and a changed manifest refused. Skips with a reason when ../shared/data/era5 is absent."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import GEOCAT

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("real_era5_bench", REPO / "bench" / "real_era5.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from flownp.checkpoint import save_checkpoint
    from flownp.core.config import ModelConfig
    from flownp.core.model import FlowNP
    from ingest.normalize import Normalizer
    from ingest.region import MEMPHIS

    import torch

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, embed_hidden=16, head_hidden=32)
    path = tmp_path_factory.mktemp("tinyck") / "tiny.pt"
    save_checkpoint(path, {"kind": "pretrain", "model_config": cfg.to_dict(), "model": FlowNP(cfg).state_dict(),
                           "ema": None, "step": 0, "normalizer": Normalizer.reference().to_dict(),
                           "region": MEMPHIS.to_dict()})
    return path


@pytest.fixture(scope="module")
def quick_run(geocat_file, bench, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["--file", str(geocat_file), "--quick", "--checkpoint", str(tiny_checkpoint), "--ll-solver", "midpoint:4",
            "--solver", "euler:4", "--manifest", str(out / "manifest.json"), "--json", str(out / "r.json"), "--quiet"]
    assert bench.main(args) == 0
    return out, args, json.loads((out / "r.json").read_text())


def test_quick_json_structure_and_units(quick_run, bench):
    _, _, res = quick_run
    assert res["benchmark"] == "real-era5" and "evaluation only" in res["use"]
    assert res["n_points"] == 1245 and res["units"]["rmse"]["sp"] == "Pa" and res["units"]["rmse"]["t2m"] == "K"
    assert res["units"]["era5_log_jacobian_per_point"] == pytest.approx(-math.log(1000.0))
    assert set(res["regimes"]) == {"dense", "sparse"}
    man = res["manifest"]
    assert man["file_sha256"] == res["file_sha256"] and man["seed"] == 0
    labels = set(res["methods"])
    assert {"IDW", "GP (fitted)"} <= labels and any(lbl.startswith("FlowNP") for lbl in labels)
    for regime, (lo, hi) in bench.REGIMES.items():
        r = res["regimes"][regime]
        assert r["n_splits"] == 2 and all(lo <= n <= hi for n in r["n_ctx"])
        assert [s["n_ctx"] for s in man["regimes"][regime]["splits"]] == r["n_ctx"]
        assert all(s["n_tgt"] == 1245 - s["n_ctx"] for s in man["regimes"][regime]["splits"])
        for label in labels:
            e = r["era5"][label]
            assert set(e["rmse"]) == set(e["crps"]) == set(e["cov50"]) == set(e["cov90"]) == {"sp", "t2m", "u10", "v10"}
            assert all(math.isfinite(v) for v in e["rmse"].values()) and math.isfinite(e["log_lik"])
            raw = r["evaluate_predictor"][label]
            # ERA5 units: sp RMSE in Pa = kPa * 1000, log-lik = model-unit value - ln(1000)
            assert e["rmse"]["sp"] == pytest.approx(1000.0 * raw["rmse"]["sp"])
            assert e["rmse"]["t2m"] == pytest.approx(raw["rmse"]["t2m"])
            assert e["log_lik"] == pytest.approx(raw["tar_ll_physical"] - math.log(1000.0))
            assert raw["n_tasks"] == 2 and raw["n_samples"] == 4
            # per split (one task per batch, split order): their mean is the reported log-likelihood
            assert len(e["log_lik_per_split"]) == 2
            assert sum(e["log_lik_per_split"]) / 2 == pytest.approx(e["log_lik"])
        flow = next(lbl for lbl in labels if lbl.startswith("FlowNP"))
        assert set(r["compare"][flow]["goals"]) == set(bench.GOAL_TEXT)
        assert r["compare"]["GP (fitted)"]["log_lik_minus_gp"] == 0.0


def test_gp_beats_idw_on_the_dense_real_map(quick_run):
    _, _, res = quick_run
    e = res["regimes"]["dense"]["era5"]
    for v in ("sp", "t2m", "u10", "v10"):
        assert e["GP (fitted)"]["rmse"][v] < e["IDW"]["rmse"][v], (v, e["GP (fitted)"]["rmse"], e["IDW"]["rmse"])
    assert e["GP (fitted)"]["log_lik"] > e["IDW"]["log_lik"]


def test_the_committed_manifest_names_the_same_splits(geocat_file, bench):
    want = bench.build_manifest(geocat_file, bench.sha256_file(geocat_file), 0, bench.MEMPHIS,
                                {r: bench.make_splits(r, 2, 0, 1245) for r in bench.REGIMES}, "")
    bench.check_manifest(json.loads(bench.DEFAULT_MANIFEST.read_text()), want, bench.DEFAULT_MANIFEST)


def test_a_changed_manifest_is_refused(quick_run, bench, capsys):
    out, args, _ = quick_run
    path = out / "manifest.json"
    man = json.loads(path.read_text())
    man["regimes"]["sparse"]["splits"][1]["n_ctx"] += 1
    bad = out / "changed.json"
    bad.write_text(json.dumps(man))
    i = args.index("--manifest")
    capsys.readouterr()
    assert bench.main(args[:i + 1] + [str(bad)] + args[i + 2:]) == 2
    assert "does not match" in capsys.readouterr().out
    with pytest.raises(bench.BenchError, match="seed"):
        bench.check_manifest({**json.loads(path.read_text()), "seed": 1}, json.loads(path.read_text()), path)


def test_skips_with_a_reason_without_the_shared_data(bench, tmp_path):
    # what the fixture does when ../shared/data/era5 is absent, and what the bench says itself
    if not GEOCAT.exists():
        pytest.skip("real ERA5 sample not found: ../shared/data/era5 is absent beside the checkout")
    with pytest.raises(bench.BenchError, match="not there"):
        bench.load_map(tmp_path / "missing.nc")
