"""deploy/ cannot be run here (no Docker engine, no cluster): check what can be checked. Every YAML parses,
the manifests carry what they must (probes on /livez and /readyz, resources, the API key from a Secret,
an elastic torchrun with c10d rendezvous that resumes), and every command they run exists in the package
and parses with the options given."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from flownp.jobs.cli import app as flownp_app
from flownp.jobs.retrain import RetrainJob

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def parses(args: list[str]) -> None:
    """The flownp CLI accepts these arguments (options and values checked, nothing run)."""
    cmd = typer.main.get_command(flownp_app)
    ctx = cmd.make_context("flownp", list(args))
    sub = cmd.get_command(ctx, args[0])
    sub.make_context(args[0], list(args[1:]), parent=ctx)


def test_every_yaml_parses():
    files = list(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        assert docs(f), f


def test_dockerfile_entry_command_is_a_console_script():
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = re.search(r'^CMD \[(.*)\]$', text, re.M)
    assert cmd, "Dockerfile needs an exec-form CMD"
    exe = cmd.group(1).split(",")[0].strip().strip('"')
    assert exe in scripts(), f"{exe} is not a console script of the package"
    assert "USER 10001" in text and "HEALTHCHECK" in text and "TORCH_INDEX" in text


def test_serving_deployment_has_probes_resources_and_secret_key():
    dep = next(d for d in docs(DEPLOY / "k8s" / "serving.yaml") if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["command"][0] in scripts()
    env = {e["name"]: e.get("value") for e in c["env"]}
    keys_mount = env["FLOWNP_API_KEYS_FILE"].rsplit("/", 1)[0]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert "secret" in vols[mounts[keys_mount]]  # the key comes from a Secret, never from the manifest
    assert not any("key" in (e.get("value") or "").lower() and "/" not in e.get("value", "") for e in c["env"])


def test_training_job_is_elastic_torchrun_that_resumes():
    job = next(d for d in docs(DEPLOY / "k8s" / "training-job.yaml") if d["kind"] == "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    cmd = c["command"]
    assert cmd[0] == "torchrun" and "--rdzv-backend=c10d" in cmd and any(a.startswith("--nnodes=") for a in cmd)
    assert any(a.startswith("--max-restarts=") for a in cmd)
    i = cmd.index("flownp.jobs.cli")
    args = [a for a in cmd[i + 1:]]
    assert "--resume" in args
    parses(args)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_compose_runs_the_service_and_a_valid_retraining_job():
    comp = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    api, job = comp["services"]["api"], comp["services"]["retrain"]
    assert "registry:/registry:ro" in api["volumes"] and any(v.startswith("registry:/registry") for v in job["volumes"])
    assert job["command"][:2] == ["flownp", "retrain"]
    parses(job["command"][1:])
    cfg = RetrainJob.model_validate(yaml.safe_load((DEPLOY / "jobs" / "retrain.yaml").read_text()))
    assert cfg.registry == "/registry" and cfg.pretrain and cfg.finetune


def test_readme_documents_what_was_not_run():
    text = (ROOT / "README.md").read_text()
    assert "deploy/" in text and re.search(r"not (been )?run", text)


@pytest.mark.parametrize("args", [["pretrain", "--data", "s", "--out", "o", "--no-such-option"],
                                  ["finetune", "--from", "x"]])
def test_the_parse_check_can_fail(args):
    with pytest.raises(Exception):
        parses(args)


def test_shell_lines_in_readme_deploy_section_parse():
    text = (ROOT / "README.md").read_text()
    lines = [m.group(1) for m in re.finditer(r"^\s+(flownp (?:retrain|registry) [^\n#]*)", text, re.M)]
    # the README shows a retrain and the registry commands: so this check can fail, it must find them
    assert len(lines) >= 3, lines
    assert any(" retrain " in f" {ln} " for ln in lines) and any(" registry " in f" {ln} " for ln in lines), lines
    for line in lines:
        parses(shlex.split(line)[1:])


def claim_names(node) -> list[str]:
    """Every persistentVolumeClaim.claimName anywhere in a manifest."""
    if isinstance(node, dict):
        own = [node["persistentVolumeClaim"]["claimName"]] if isinstance(node.get("persistentVolumeClaim"), dict) else []
        return own + [n for v in node.values() for n in claim_names(v)]
    if isinstance(node, list):
        return [n for v in node for n in claim_names(v)]
    return []


def test_every_referenced_volume_claim_is_defined():
    manifests = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in docs(f)]
    claims = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "PersistentVolumeClaim"}
    used = {n for d in manifests for n in claim_names(d)}
    assert {"flownp-data", "flownp-registry"} <= used  # the walk finds them (so this check can fail)
    assert used <= set(claims), f"claims used but not defined: {sorted(used - set(claims))}"
    for name in used:  # shared by pods on several nodes (replicas; job ranks): ReadWriteMany
        assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert claims[name]["spec"]["resources"]["requests"]["storage"]
    assert "RWX" in (DEPLOY / "k8s" / "storage.yaml").read_text()
    assert claim_names({"a": [{"persistentVolumeClaim": {"claimName": "x"}}]}) == ["x"]


def test_training_steps_are_200_epochs_at_the_jobs_world_size():
    """--steps is per rank and each rank draws its own batch (flownp/train.py, ingest/tasks.TaskSampler):
    an epoch of the 34,560 training maps is ceil(maps / batch) // world steps."""
    job = next(d for d in docs(DEPLOY / "k8s" / "training-job.yaml") if d["kind"] == "Job")
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    opt = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in cmd if a.startswith("--") and "=" in a}
    world = int(job["spec"]["parallelism"]) * int(opt["--nproc-per-node"])
    assert int(opt["--nnodes"].split(":")[-1]) == int(job["spec"]["completions"]) == int(job["spec"]["parallelism"])
    import numpy as np

    from ingest.region import MEMPHIS
    from ingest.tasks import TaskConfig, TaskSampler

    lo, hi = (int(x) for x in opt["--n-ctx"].split("-"))
    maps = np.broadcast_to(np.zeros((1, MEMPHIS.n_points, 4), np.float32), (34_560, MEMPHIS.n_points, 4))
    per_rank = TaskSampler(maps, MEMPHIS.circle_xy, TaskConfig(lo, hi, None, int(opt["--batch-size"]), 0),
                           rank=0, world=world)
    assert world == 2 and len(per_rank) == 173  # steps per epoch on each rank
    assert int(opt["--steps"]) == 200 * len(per_rank)
