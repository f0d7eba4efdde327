"""Retraining and the registry: a worse candidate is not promoted, a better one is (with the comparison
in its manifest), a job killed between fine-tuning and promotion leaves the registry unchanged and a
rerun continues without redoing finished stages; versions are verified and the current one protected."""

import json
import shutil

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from flownp.jobs.cli import app
from flownp.registry import Registry, RegistryError
from flownp.jobs.retrain import EvalSpec, RetrainJob, compare, run_job
from ingest.store import Store
from service.settings import Settings
from tests.test_service_common import running, small_request

TINY = {"d_model": 16, "n_layers": 1, "batch_size": 4, "n_ctx": "60-60", "n_tgt": 24, "warmup": 2, "lr": 2e-3}
EVAL = {"n_tasks": 4, "n_ctx": "100-100", "n_tgt": 24, "ll_solver": "midpoint:8"}


KEY = {"Authorization": "Bearer k"}


def job_file(tmp_path, name, store, pretrain=None, finetune=None, raw=()):
    cfg = {"work": f"work-{name}", "registry": "registry", "store": str(store), "raw": list(raw),
           "evaluate": EVAL}
    if pretrain:
        cfg["pretrain"] = {**TINY, **pretrain}
    if finetune:
        cfg["finetune"] = finetune
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def store(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


@pytest.mark.slow
def test_promotes_only_a_better_candidate_and_the_service_then_serves_it(store, tmp_path):
    reg = Registry(tmp_path / "registry")
    good = run_job(RetrainJob.from_yaml(job_file(tmp_path, "good", store, {"steps": 120, "ckpt_every": 60})),
                   progress=False)
    assert good["promoted"] == "v0001" and reg.current() == "v0001"
    assert reg.manifest("v0001")["comparison"]["current"] is None  # first model: nothing to beat
    with running(Settings(registry=reg.root, api_keys=["k"])) as client:
        assert client.get("/v1/models", headers=KEY).json()["default"] == "v0001"
        bad = run_job(RetrainJob.from_yaml(job_file(tmp_path, "bad", store, {"steps": 2, "ckpt_every": 2})),
                      progress=False)
        assert bad["promoted"] is None and bad["comparison"]["candidate"] < bad["comparison"]["current"]
        assert reg.versions() == ["v0001"] and reg.current() == "v0001"
        better = run_job(RetrainJob.from_yaml(job_file(tmp_path, "better", store,
                                                       {"steps": 60, "init": "current", "ckpt_every": 60})),
                         progress=False)
        m = reg.manifest("v0002")
        assert better["promoted"] == "v0002" and reg.current() == "v0002"
        assert better["pretrain_init"] == "v0001"
        assert m["comparison"]["current_version"] == "v0001" and m["comparison"]["candidate"] > m["comparison"]["current"]
        assert m["comparison"]["metric"] == "tar_ll_era5" and m["comparison"]["scoring"]["n_probes"] == 1
        assert m["files"]["model.pt"] and m["data"]["years_per_split"]["test"] == [1989]
        assert client.post("/v1/admin/reload").status_code == 401  # the admin route is behind the key
        r = client.post("/v1/admin/reload", headers=KEY)
        assert r.status_code == 200 and r.json()["default"] == "v0002" and r.json()["previous_default"] == "v0001"
        assert client.get("/v1/models", headers=KEY).json()["default"] == "v0002"
        ans = client.post("/v1/extrapolate", json=small_request(), headers=KEY)
        assert ans.status_code == 200 and ans.json()["model"]["version"] == "v0002", ans.text[:300]


@pytest.mark.slow
def test_killed_between_finetune_and_promotion_leaves_registry_unchanged(store, tmp_path):
    path = job_file(tmp_path, "ft", store, {"steps": 40, "ckpt_every": 20},
                    {"steps": 2, "batch_size": 2, "k_steps": 2, "inversion_steps": 2, "n_ctx": "60-60", "n_tgt": 16,
                     "ckpt_every": 2})
    job = RetrainJob.from_yaml(path)
    state = run_job(job, progress=False, stop_after="finetune")
    assert state["done"] == ["ingest", "pretrain", "finetune"]
    reg = Registry(tmp_path / "registry")
    assert reg.versions() == [] and reg.current() is None
    log = tmp_path / "work-ft" / "pretrain" / "log.jsonl"
    before = log.read_text()
    state = run_job(job, progress=False)  # the rerun continues: nothing retrained, then promotes
    assert log.read_text() == before
    assert state["promoted"] == "v0001" and reg.current() == "v0001"
    assert reg.manifest("v0001")["base"]["model"]["d_model"] == 16
    # the fine-tuned model competed with the model it was tuned from, and the better one was taken
    scores, chosen = state["candidates"], state["chosen"]
    assert set(scores) == {"finetuned", "pretrained"} and scores[chosen] == max(scores.values())
    m = reg.manifest("v0001")
    assert m["comparison"]["chosen"] == chosen and m["comparison"]["candidate"] == scores[chosen]
    from ingest.io import sha256_file
    chosen_file = tmp_path / "work-ft" / ("finetune" if chosen == "finetuned" else "pretrain") / "best.pt"
    assert m["files"]["model.pt"] == sha256_file(chosen_file)
    again = run_job(job, progress=False)  # a third run promotes nothing new
    assert again["promoted"] == "v0001" and reg.versions() == ["v0001"]


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["if_better", "always"])
def test_a_fine_tune_that_hurts_is_not_kept_unless_asked(store, tmp_path, keep):
    # a destructive fine-tune (lr 0.5): the pretrained model must be the candidate, unless told otherwise
    path = job_file(tmp_path, keep, store, {"steps": 20, "ckpt_every": 20},
                    {"steps": 2, "batch_size": 2, "k_steps": 2, "inversion_steps": 2, "n_ctx": "60-60", "n_tgt": 16,
                     "ckpt_every": 2, "lr": 0.5, "warmup": 0})
    cfg = yaml.safe_load(path.read_text())
    cfg["evaluate"] = {**cfg["evaluate"], "keep_finetune": keep}
    path.write_text(yaml.safe_dump(cfg))
    state = run_job(RetrainJob.from_yaml(path), progress=False)
    from ingest.io import sha256_file

    m = Registry(tmp_path / "registry").manifest(state["promoted"])
    if keep == "if_better":
        assert state["chosen"] == "pretrained", state["candidates"]
        assert state["candidates"]["pretrained"] > state["candidates"]["finetuned"] + 1.0
        assert m["files"]["model.pt"] == sha256_file(tmp_path / f"work-{keep}" / "pretrain" / "best.pt")
    else:
        assert state["chosen"] == "candidate" and set(state["candidates"]) == {"candidate"}
        assert m["files"]["model.pt"] == sha256_file(tmp_path / f"work-{keep}" / "finetune" / "best.pt")


def test_registry_verifies_files_and_protects_current(tmp_path):
    reg = Registry(tmp_path / "r")
    src = tmp_path / "m.pt"
    src.write_bytes(b"weights-1")
    v1 = reg.add(src, metrics={"tar_ll": 1.0}, promote=True)
    src.write_bytes(b"weights-2")
    v2 = reg.add(src, metrics={"tar_ll": 2.0})
    assert (v1, v2) == ("v0001", "v0002") and reg.current() == "v0001"
    with pytest.raises(RegistryError, match="current"):
        reg.delete("v0001")
    with pytest.raises(RegistryError, match="unknown model version"):
        reg.model_path("v0009")
    with pytest.raises(RegistryError, match="unknown model version"):
        reg.manifest("../etc")
    (reg.versions_dir / "v0002" / "model.pt").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="sha256"):
        reg.promote("v0002")
    assert reg.current() == "v0001"
    reg.delete("v0002")
    assert reg.versions() == ["v0001"]
    assert not list(reg.versions_dir.glob(".*part"))
    rows = [json.loads(x) for x in CliRunner().invoke(app, ["registry", "list", "--root", str(reg.root)]).output.splitlines()]
    assert rows[0]["version"] == "v0001" and rows[0]["current"] is True


@pytest.mark.parametrize("text, match", [
    ("work: w\nregistry: r\nstore: s\n", "pretrain or a finetune"),
    ("work: w\nregistry: r\nstore: s\npretrain: {steps: 0}\n", "greater than or equal"),
    ("work: w\nregistry: r\nstore: s\npretrain: {}\nsurprise: 1\n", "Extra inputs"),
    ("[1, 2", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_job_files_are_refused(tmp_path, text, match):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        RetrainJob.from_yaml(p)
    r = CliRunner().invoke(app, ["retrain", "--config", str(p)])
    assert r.exit_code == 2


def test_failed_reload_keeps_serving_the_old_model(tmp_path):
    from pathlib import Path

    default = Path(__file__).resolve().parents[1] / "flownp" / "models" / "default.pt"
    reg = Registry(tmp_path / "registry")
    reg.add(default, metrics={"tar_ll": 0.0}, promote=True)
    reg.add(default, metrics={"tar_ll": 1.0}, promote=True)
    with running(Settings(registry=reg.root)) as client:
        assert client.get("/v1/models").json()["default"] == "v0002"
        (reg.versions_dir / "v0002" / "model.pt").write_bytes(b"tampered")  # corrupt the served version on disk
        r = client.post("/v1/admin/reload")
        assert r.status_code == 409 and r.json()["error"]["code"] == "reload_failed"
        assert str(tmp_path) not in r.text  # no machine paths in errors
        assert client.get("/v1/models").json()["default"] == "v0002"  # still the loaded, verified weights
        assert client.post("/v1/extrapolate", json=small_request()).status_code == 200


def test_a_stop_between_add_and_promote_is_finished_by_the_rerun(store, tmp_path, monkeypatch):
    path = job_file(tmp_path, "crash", store, {"steps": 4, "ckpt_every": 4})
    job = RetrainJob.from_yaml(path)
    real = Registry._promote

    def crash(self, version, expect):  # the process dies after the version is in, before CURRENT moves
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Registry, "_promote", crash)
    with pytest.raises(KeyboardInterrupt):
        run_job(job, progress=False)
    reg = Registry(tmp_path / "registry")
    assert reg.versions() == ["v0001"] and reg.current() is None
    monkeypatch.setattr(Registry, "_promote", real)
    state = run_job(job, progress=False)
    assert state["promoted"] == "v0001" and reg.current() == "v0001" and reg.versions() == ["v0001"]
    m = reg.manifest("v0001")  # the manifest says which metric the gate compared, and its value
    assert m["comparison"]["metric"] == "tar_ll_era5" and "ERA5 units" in m["comparison"]["units"]
    assert m["metrics"]["tar_ll_era5"] == m["comparison"]["candidate"] == m["metrics"]["eval"]["tar_ll_era5"]
    # over ERA5 units (Pa) the density is ln(1000) per point below the one over model units (kPa)
    ev = m["metrics"]["eval"]
    assert ev["tar_ll_era5"] - ev["tar_ll_physical"] == pytest.approx(np.log(1e-3))
    # the data window: first and last map of each split (the tiny store: days 1-2 of every month, hourly)
    window = m["data"]["time_range_per_split"]
    assert window == {"train": ["1986-01-01T00:00:00", "1986-12-02T23:00:00"],
                      "valid": ["1988-01-01T00:00:00", "1988-12-02T23:00:00"],
                      "test": ["1989-01-01T00:00:00", "1989-12-02T23:00:00"], "unused": None}
    times, _ = Store.open(store).load("test", normalized=False)  # the same window by another read
    assert window["test"] == [str(times.min().astype("datetime64[s]")), str(times.max().astype("datetime64[s]"))]


def test_registry_refuses_a_stale_comparison_and_a_dangling_current(tmp_path):
    reg = Registry(tmp_path / "r")
    src = tmp_path / "m.pt"
    src.write_bytes(b"1")
    reg.add(src, metrics={}, promote=True)                       # v0001 current
    src.write_bytes(b"2")
    v2 = reg.add(src, metrics={})
    with pytest.raises(RegistryError, match="changed"):          # a job compared against "no model"
        reg.promote(v2, expect_current=None)
    reg.promote(v2, expect_current="v0001")
    assert reg.current() == "v0002"
    (reg.root / "CURRENT").write_text("v0009\n")
    with pytest.raises(RegistryError, match="not a version"):
        reg.current()


def _result(tar_ll, tar_ll_era5, probe_seed=0):
    pred = {"estimator": "hutchinson", "n_probes": 1, "probe_seed": probe_seed, "ll_solver": "midpoint(25)"}
    return {"eval_set": {"split": "test", "seed": 0},
            "flownp": {"tar_ll": tar_ll, "tar_ll_era5": tar_ll_era5, "n_tasks": 4, "predictor": pred}}


def test_gate_compares_physical_log_likelihood_not_each_models_normalised_units():
    # the candidate's normaliser (grown store) is narrower: it wins in its own units, loses in physical ones
    cand, cur = _result(tar_ll=1.0, tar_ll_era5=-6.0), _result(tar_ll=0.5, tar_ll_era5=-5.0)
    c = compare(cand, cur, current_version="v0001")
    assert c["metric"] == "tar_ll_era5" and c["promoted"] is False
    assert (c["candidate"], c["current"]) == (-6.0, -5.0)
    # ... and the other way round: worse in its own units, better in physical ones
    c = compare(_result(tar_ll=0.2, tar_ll_era5=-4.0), cur)
    assert c["promoted"] is True
    assert compare(_result(0.2, -4.0), cur, min_gain=1.5)["promoted"] is False  # the margin is in nats per point
    assert compare(cand, None)["promoted"] is True  # nothing to beat
    with pytest.raises(ValueError, match="not paired"):  # different Hutchinson probes: no paired comparison
        compare(_result(0.2, -4.0, probe_seed=1), cur)
    other = {**cur, "eval_set": {"split": "test", "seed": 1}}
    with pytest.raises(ValueError, match="different evaluation sets"):
        compare(cand, other)
    # older job files name the metric tar_ll or tar_ll_physical: read as the ERA5-unit form (any fixed
    # units rank two models alike)
    assert EvalSpec(metric="tar_ll").metric == EvalSpec(metric="tar_ll_physical").metric == "tar_ll_era5" \
        == EvalSpec().metric


def test_version_numbers_are_ordered_and_counted_numerically(tmp_path):
    reg = Registry(tmp_path / "r")
    for v in ("v0002", "v9998", "v9999"):
        (reg.versions_dir / v).mkdir(parents=True)
    src = tmp_path / "m.pt"
    src.write_bytes(b"w")
    assert reg.add(src, metrics={}) == "v10000"
    assert reg.add(src, metrics={}) == "v10001"  # text order would put v10000 first and make v10000 again
    assert reg.versions() == ["v0002", "v9998", "v9999", "v10000", "v10001"]
