"""The offline retraining job: ingest new files -> pretrain (or continue) -> fine-tune -> evaluate on a
frozen test set -> promote to the registry only if the candidate beats the current model (target
log-likelihood over ERA5 units, both scored on the same tasks with the same probes: `compare`).

`flownp retrain --config JOB.yaml` (a plain YAML file validated by `RetrainJob`). Every stage leaves its
output in the job's work directory and is skipped when done, training stages resume from their last
checkpoint, so a killed job rerun with the same config continues where it stopped. Promotion is the last
step and is atomic (registry.add), and a candidate already in the registry (same sha256) is never added
twice, so a rerun after a crash at any point never half-promotes or double-promotes.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from flownp.jobs import options
from flownp.registry import Registry
from ingest.parsing import parse_range
from ingest.space import UNITS
from ingest.io import sha256_file, write_json_atomic


GATE_METRIC = "tar_ll_era5"  # over ERA5 units, as REST and the notebook report (docs/protocol.md §6)
# what makes two scores paired: the same frozen tasks, and the same estimator, probes and solver on them
PAIRED_KEYS = ("estimator", "n_probes", "probe_seed", "ll_solver")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalSpec(_Strict):
    split: Literal["valid", "test"] = "test"
    n_tasks: int = Field(16, ge=1)
    n_ctx: str = "50-1000"
    n_tgt: Optional[int] = Field(245, ge=1)
    seed: int = 0
    ll_solver: str = "midpoint:25"
    metric: Literal["tar_ll_era5"] = Field(
        "tar_ll_era5", description="the gate compares tar_ll over ERA5 units (Pa, K, m s-1): each checkpoint's "
        "own normalised units differ once new files change the normaliser. 'tar_ll' and 'tar_ll_physical' "
        "(older configs) read as this: over any fixed units the comparison is the same")
    min_gain: float = Field(0.0, description="nats per point the candidate must win by")
    keep_finetune: Literal["if_better", "always"] = Field(
        "if_better", description="with both a pretrain and a fine-tune stage, the candidate is the better of "
        "the two on the gate's metric (fine-tuning does not always raise it: docs/results.md section 4), "
        "or always the fine-tuned model")

    @field_validator("metric", mode="before")
    @classmethod
    def _physical(cls, v: Any) -> Any:
        return GATE_METRIC if v in ("tar_ll", "tar_ll_physical") else v


class _Stage(_Strict):
    """A training stage of the job file: its keys are the options of `groups` (flownp.jobs.options: the
    fields of the config dataclasses, with the same defaults as the `flownp` CLI's)."""

    groups: ClassVar[tuple[Any, ...]] = ()

    def values(self) -> dict[str, Any]:
        return self.model_dump()

    @model_validator(mode="after")
    def _configs_build(self) -> "_Stage":
        for g in self.groups:  # the dataclasses' own checks, when the file is read
            g.build(self.values())
        return self


class _Pretrain(_Stage):
    init: Literal["scratch", "current"] = "scratch"


PretrainSpec = create_model("PretrainSpec", __base__=_Pretrain, **options.yaml_fields(options.MODEL, options.TRAIN))
PretrainSpec.groups = (options.MODEL, options.TRAIN)
FinetuneSpec = create_model("FinetuneSpec", __base__=_Stage,
                            **options.yaml_fields(options.FINETUNE, options.GAV, options.FINETUNE_TRAIN))
FinetuneSpec.groups = (options.FINETUNE, options.GAV, options.FINETUNE_TRAIN)


class RetrainJob(_Strict):
    """What one retraining job does. Paths are relative to the config file's directory."""

    work: str
    registry: str
    store: str
    raw: list[str] = Field(default_factory=list, description="glob patterns of new raw ERA5 files to ingest")
    pretrain: Optional[PretrainSpec] = None  # type: ignore[valid-type]
    finetune: Optional[FinetuneSpec] = None  # type: ignore[valid-type]
    evaluate: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _something_to_do(self) -> "RetrainJob":
        if self.pretrain is None and self.finetune is None:
            raise ValueError("a job needs a pretrain or a finetune stage (or both)")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RetrainJob":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a retraining config is a mapping")
        job = cls.model_validate(raw)
        base = path.parent
        fix = lambda p: str(p if Path(p).is_absolute() else base / p)  # noqa: E731
        return job.model_copy(update={"work": fix(job.work), "registry": fix(job.registry), "store": fix(job.store),
                                      "raw": [fix(p) for p in job.raw]})


def _flownp_weights(ck: dict[str, Any], key: str) -> dict[str, Any]:
    """The FlowNP weights of a checkpoint: all of them, or a GAV model's base."""
    sd = ck[key] if ck.get(key) is not None else ck["model"]
    if ck.get("gav_config") is not None:
        sd = {k[len("base."):]: v for k, v in sd.items() if k.startswith("base.")}
    return sd


def compare(cand: dict[str, Any], cur: dict[str, Any] | None, *, min_gain: float = 0.0,
            current_version: str | None = None) -> dict[str, Any]:
    """The promotion gate on two `evaluate_checkpoint` results: the candidate wins when its target
    log-likelihood over ERA5 units (nats per target point over Pa, K, m s-1) beats the current model's by
    more than `min_gain`. Normalised tar_ll is no common scale: each checkpoint's is in its own normaliser's
    units, which shift by a constant when new training years change the normaliser. The two scores must be
    paired (same frozen tasks, same estimator with the same probe seed), else the comparison is refused."""
    c = cand["flownp"]
    if cur is not None:
        o = cur["flownp"]
        if cand["eval_set"] != cur["eval_set"] or c["n_tasks"] != o["n_tasks"]:
            raise ValueError("candidate and current model were scored on different evaluation sets")
        diff = {k: (c["predictor"].get(k), o["predictor"].get(k)) for k in PAIRED_KEYS
                if c["predictor"].get(k) != o["predictor"].get(k)}
        if diff:
            raise ValueError(f"candidate and current model were scored differently (not paired): {diff}")
    cand_metric = float(c[GATE_METRIC])
    cur_metric = float(cur["flownp"][GATE_METRIC]) if cur is not None else None
    wins = cur_metric is None or cand_metric > cur_metric + min_gain
    return {"metric": GATE_METRIC, "units": f"{UNITS['era5']}, per target point, 4 variables summed",
            "candidate": cand_metric, "current": cur_metric, "current_version": current_version,
            "min_gain": min_gain, "eval_set": cand["eval_set"],
            "scoring": {k: c["predictor"].get(k) for k in PAIRED_KEYS}, "promoted": wins}


def time_range_per_split(store: Any) -> dict[str, list[str] | None]:
    """The data window of a store: [first, last] map time (ISO 8601, seconds, UTC as stored) of each split
    (None for a split without maps), read from the time and split coordinates alone (no map values)."""
    import numpy as np

    from ingest.build import SPLIT_CODES

    # closed before returning: a store dataset left open while another read of the same shards opens them
    # (Store.load) crashes the netCDF library
    with store.dataset() as ds:
        times = ds["time"].values.astype("datetime64[s]")
        codes = np.asarray(ds["split"].values)
    out: dict[str, list[str] | None] = {}
    for code, name in enumerate(SPLIT_CODES):
        t = times[codes == code]
        out[name] = [str(t.min()), str(t.max())] if len(t) else None
    return out


def _done(run: Path, steps: int) -> bool:
    from flownp.checkpoint import load_checkpoint

    return (run / "last.pt").exists() and int(load_checkpoint(run / "last.pt")["step"]) >= steps


def run_job(job: RetrainJob, *, progress: bool = True, stop_after: str | None = None) -> dict[str, Any]:
    """Run (or continue) the job; returns its state. `stop_after` (a stage name) ends the job there, as a
    crash would (for tests)."""
    from flownp.core.config import ModelConfig
    from flownp.jobs.evaluate import evaluate_checkpoint
    from flownp.jobs.finetune import finetune
    from flownp.jobs.train import Trainer
    from ingest.build import build_store
    from ingest.store import Store
    from ingest.tasks import make_eval_set, save_eval_set

    work, reg = Path(job.work), Registry(job.registry)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    save = lambda: write_json_atomic(state_path, state)  # noqa: E731

    def stage(name: str) -> bool:
        """True when the job should stop here (testing hook)."""
        state.setdefault("done", [])
        if name not in state["done"]:
            state["done"].append(name)
        save()
        return stop_after == name

    # 1. ingest (incremental: files already in the store are skipped)
    files = sorted({f for pattern in job.raw for f in glob.glob(pattern)})
    if job.raw and not files:
        raise ValueError(f"no raw files match {job.raw}")
    if files:
        build_store(files, job.store, progress=progress)
    store = Store.open(job.store)
    if stage("ingest"):
        return state

    # 2. the frozen evaluation set, drawn once per job directory
    es_dir = work / "evalset"
    if not (es_dir / "manifest.json").exists():
        e = job.evaluate
        times, _ = store.load(e.split, normalized=False)
        lo, hi = parse_range(e.n_ctx)
        save_eval_set(make_eval_set(times, store.region.n_points, split=e.split, n_tasks=min(e.n_tasks, len(times)),
                                    n_ctx_min=lo, n_ctx_max=hi, n_tgt=e.n_tgt, seed=e.seed,
                                    extra={"store_manifest_sha256": store.manifest_sha256}), es_dir)

    current = reg.current()
    candidate: Path | None = None
    # 3. pretrain (from scratch, or continuing the current model's weights)
    if job.pretrain:
        p, run = job.pretrain, work / "pretrain"
        tcfg = options.TRAIN.build(p.values())
        if not _done(run, tcfg.steps):
            mcfg = options.MODEL.build(p.values())
            if p.init == "current" and current:
                from flownp.checkpoint import load_checkpoint

                mcfg = ModelConfig.from_dict(load_checkpoint(reg.model_path(current))["model_config"])
            t = Trainer(store, run, mcfg, tcfg)
            if (run / "last.pt").exists():
                t.resume(run / "last.pt")
            elif p.init == "current" and current:
                from flownp.checkpoint import load_checkpoint

                ck = load_checkpoint(reg.model_path(current))
                t.model.load_state_dict(_flownp_weights(ck, "model"))  # a GAV model continues from its base
                t.ema.load_state_dict(_flownp_weights(ck, "ema"))
                state["pretrain_init"] = current
            t.run(progress=progress)
        candidate = run / "best.pt" if (run / "best.pt").exists() else run / "last.pt"
    if stage("pretrain"):
        return state

    pretrained = candidate
    # 4. fine-tune (the pretrained candidate, or the current model when there is no pretraining)
    if job.finetune:
        f, run = job.finetune, work / "finetune"
        base = candidate or (reg.model_path(current) if current else None)
        if base is None:
            raise ValueError("fine-tuning needs a pretrain stage or a current model in the registry")
        ft, tcfg = options.finetune_config(f.values()), options.FINETUNE_TRAIN.build(f.values())
        if not _done(run, tcfg.steps):
            finetune(base, job.store, run, ft, tcfg, resume=True, progress=progress)
        candidate = run / "best.pt" if (run / "best.pt").exists() else run / "last.pt"
    if stage("finetune"):
        return state

    # 5. evaluate the candidate and the current model on the same frozen set
    assert candidate is not None
    e = job.evaluate

    # both models on the same frozen tasks with the same 1-probe Hutchinson estimator and probe seed: the
    # probes are drawn per batch from that seed, so the two scores are paired
    scoring = {"ll_solver": e.ll_solver, "probe_seed": e.seed, "probe_draw": "per batch", "n_probes": 1,
               "metric": GATE_METRIC}

    def score(ckpt: Path, name: str) -> dict[str, Any]:
        out = work / f"eval-{name}.json"
        sha = sha256_file(ckpt)
        if out.exists():
            r = json.loads(out.read_text())
            if r.get("checkpoint_sha256") == sha and r.get("scoring") == scoring:
                return r
        r = evaluate_checkpoint(str(ckpt), job.store, split=e.split, eval_set=str(es_dir), n_samples=0,
                                ll_solver=e.ll_solver, n_probes=scoring["n_probes"], seed=scoring["probe_seed"],
                                exact=False, oracle=False, progress=progress)
        r["checkpoint_sha256"], r["scoring"] = sha, scoring
        write_json_atomic(out, r)
        return r

    # the fine-tuned model competes with the model it was tuned from: fine-tuning is kept only if it helps
    cands = {"candidate": candidate}
    if pretrained is not None and candidate != pretrained and e.keep_finetune == "if_better":
        cands = {"finetuned": candidate, "pretrained": pretrained}
    scored = {name: score(path, name) for name, path in cands.items()}
    chosen = max(scored, key=lambda n: float(scored[n]["flownp"][GATE_METRIC]))  # ties keep the fine-tuned
    candidate, cand = cands[chosen], scored[chosen]
    state["candidates"] = {n: float(r["flownp"][GATE_METRIC]) for n, r in scored.items()}
    state["chosen"] = chosen
    cur = score(reg.model_path(current), "current") if current else None
    if stage("evaluate"):
        return state

    # 6. promote (atomic; never twice for the same candidate)
    comparison = {**compare(cand, cur, min_gain=e.min_gain, current_version=current),
                  "stage_candidates": state["candidates"], "chosen": state["chosen"]}
    wins, cand_metric = comparison["promoted"], comparison["candidate"]
    state["comparison"] = comparison
    already = [m["version"] for m in reg.list() if m.get("files", {}).get("model.pt") == cand["checkpoint_sha256"]]
    if already and reg.current() == already[0]:  # promoted by an earlier run of this job
        state["promoted"] = already[0]
    elif wins and already:  # added by a run that stopped before promoting it: finish the promotion
        reg.promote(already[0], expect_current=current)
        state["promoted"] = already[0]
    elif wins:
        data = {"store": job.store, "store_manifest_sha256": store.manifest_sha256,
                "years_per_split": store.manifest.get("years_per_split"),
                "maps_per_split": store.manifest.get("maps_per_split"),
                "time_range_per_split": time_range_per_split(store)}
        state["promoted"] = reg.add(candidate, metrics={GATE_METRIC: cand_metric, "eval": cand["flownp"]}, data=data,
                                    base={"previous_current": current, "model": cand["flownp"]["predictor"]["model"]},
                                    comparison=comparison, promote=True, expect_current=current)
    else:
        state["promoted"] = None
    stage("promote")
    return state
