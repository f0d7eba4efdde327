"""bench/sampling_latency.py on tiny untrained models (a smoke run, no timing asserted): its JSON has every
sampler of every kind with latency and CRPS ratios to the global ODE of the same run, --task era5 skips
cleanly without the map, and a study it writes records a model's default sampler (`choose_sampler`,
`record-samplers`) that the loaded model then uses."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from flownp.default_model import choose_sampler, main as default_model_main
from tests.tiny_samplers import tiny_checkpoint, write_served

REPO = Path(__file__).resolve().parents[1]
FAST = ["--tiny", "--repeats", "1", "--reference", "midpoint:2", "--ode-solvers", "euler:1",
        "--lfm-solvers", "euler:1", "--samples", "2"]


def _bench():
    spec = importlib.util.spec_from_file_location("sampling_latency_bench", REPO / "bench" / "sampling_latency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "samplers.json"
    assert _bench().main(FAST + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_json_has_every_sampler_with_its_ratios(study, capsys):
    assert set(study) >= {"task", "reference", "models", "rows", "tiny"}
    assert study["task"]["n_ctx"] == 1000 and study["task"]["n_tgt"] == 245 and study["tiny"] is True
    assert study["reference"]["solver"] == "midpoint:2"
    got = {(r["model"], r["sampler"], r["solver"]) for r in study["rows"]}
    assert got == {("global", "ode", "midpoint:2"), ("global", "ode", "euler:1"), ("lfm", "lfm", "euler:1"),
                   ("distilled", "distilled", None), ("distilled", "lfm", "euler:1")}
    keys = {"nfe", "cost_units", "p50_s", "p90_s", "crps", "crps_ratio", "p50_ratio", "p90_ratio", "blocks", "maps"}
    for r in study["rows"]:
        assert keys <= set(r) and set(r["crps"]) == {"sp", "t2m", "u10", "v10"}
        assert r["p50_s"] > 0 and r["crps_ratio"] > 0
    ref = study["rows"][0]
    assert (ref["crps_ratio"], ref["p50_ratio"]) == (1.0, 1.0)
    rows = {(r["model"], r["sampler"], r["solver"]): r for r in study["rows"]}
    maps, taught = rows["distilled", "distilled", None], rows["distilled", "lfm", "euler:1"]
    # an untrained distilled map is its teacher's one-step Euler per block: the same samples, the same CRPS,
    # the same evaluations and cost; both cheaper than the 4 evaluations of the reference
    assert maps["crps"] == taught["crps"] and maps["nfe"] == taught["nfe"] == 2
    assert maps["cost_units"] == taught["cost_units"] < rows["global", "ode", "midpoint:2"]["cost_units"]


def test_era5_task_skips_with_a_message_when_the_map_is_absent(tmp_path, capsys):
    assert _bench().main(FAST + ["--task", "era5", "--era5", str(tmp_path / "absent.nc")]) == 0
    assert "skipped: the real ERA5 map" in capsys.readouterr().out


def test_a_study_records_the_fastest_sampler_within_the_crps_tolerance(study, tmp_path):
    measured = [("distilled", None, 2, 0.1, 1.30), ("lfm", "euler:1", None, 0.2, 1.04),
                ("lfm", "euler:8", None, 0.9, 1.00)]
    rows = [{"model": "d", "sampler": s, "solver": sol, "maps": m, "nfe": 1, "p50_s": p, "p50_ratio": p,
             "crps_ratio": c} for s, sol, m, p, c in measured]
    st = {"rows": rows, "reference": {"solver": "midpoint:100"}}
    got = choose_sampler(st, "d", ["distilled", "lfm"])
    assert got["default"] == "lfm" and got["measured"]["chosen"] == "lfm euler:1"  # the distilled maps miss 5%
    assert choose_sampler(st, "d", ["distilled", "lfm"], crps_tol=1.5)["default"] == "distilled"
    assert choose_sampler(st, "d", ["distilled"]) is None and choose_sampler(st, "other", ["lfm"]) is None
    # recorded into a checkpoint, the loaded model defaults to it
    src = write_served(tiny_checkpoint("distilled"), tmp_path / "d.pt")
    (tmp_path / "study.json").write_text(json.dumps({**study, "rows": [{**r, "model": "d"} for r in rows]}))
    default_model_main(["record-samplers", str(src), "--study", str(tmp_path / "study.json"), "--model", "d",
                        "--out", str(tmp_path / "d-recorded.pt")])
    from flownp.checkpoint import load_checkpoint
    from flownp.inference import build_model

    lm = build_model("d", load_checkpoint(tmp_path / "d-recorded.pt"), None, "test")
    assert lm.samplers["default"] == "lfm" and lm.samplers["chosen_by"] == "recorded comparison"
    assert lm.plan().name == "lfm"


def test_pack_records_the_default_sampler_of_a_study_next_to_the_solvers(study, tmp_path):
    src = write_served(tiny_checkpoint("flownp"), tmp_path / "g.pt")
    (tmp_path / "study.json").write_text(json.dumps(study))
    default_model_main(["pack", str(src), "--out", str(tmp_path / "packed"), "--sampler-study",
                        str(tmp_path / "study.json")])
    from flownp.default_model import read_manifest

    man = read_manifest(tmp_path / "packed")
    assert "solvers" in man and man["samplers"]["default"] == "ode"
    assert set(man["samplers"]["measured"]["rows"]) == {"ode midpoint:2", "ode euler:1"}
