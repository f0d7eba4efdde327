"""Fine-tuning a pretrained FlowNP by maximum likelihood of K-step reconstructions (FT-FlowNP, docs/protocol.md §8),
optionally through a GAV residual added to a frozen or lightly tuned base (docs/protocol.md §9).

A task's targets x1 (B, n_tgt, D, normalised) are paired with noise z by a coupling: `inversion` (the
frozen pretrained field integrated backwards from x1 with a fine midpoint solver, no gradient) or
`random` (z ~ N(0, I), independent of x1: the optimum is then the conditional mean and samples collapse).
The decoder takes K explicit Euler steps from z, x_{k+1} = x_k + v(k/K, x_k | context) / K, with gradients
through every step (`backprop`, `checkpoint`: recompute each step in the backward pass, or `adjoint`:
torchdiffeq's adjoint Euler, memory-light, re-encoding the context at every step). Loss: the Gaussian
negative log-likelihood of x1 under N(xhat, diag(sigma^2)) per element, sigma fixed or learned per
variable, plus an optional flow-matching regulariser. Everything else (warm-up then constant learning
rate, EMA, clipping, resume, checkpoints) is the pretraining loop's.
`control=True` makes the same run the fine-tune's continued-pretraining control at equal compute: the same
starting weights (the same model build: the base, or base + the same fresh residual), optimiser steps, batch,
task stream and learning rate, with the flow-matching objective instead of the reconstruction. Both record the
hashes of their starting weights (`start_sha256`, `start_base_sha256`); `check_same_start` refuses to pair a
fine-tune with a control that started elsewhere.
Run: `flownp finetune --from RUN/best.pt --data STORE --out FT [--mode gav] [--control]`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flownp.checkpoint import lineage_n_ctx_min, load_checkpoint, model_from_checkpoint
from flownp.jobs.distributed import init_from_env, rank_device
from flownp.core.paths import flow_matching_loss
from flownp.core.solvers import SolverConfig, solve
from flownp.jobs.train import TrainConfig, Trainer, flow_space, fm_loss, model_path, validation_loss
from ingest.configs import DictConfig
from ingest.io import sha256_file
from ingest.store import Store
from ingest.tasks import TaskBatch

MODES = ("mle", "gav")
COUPLINGS = ("inversion", "random")
GRADS = ("backprop", "checkpoint", "adjoint")


#: fine-tuning's optimiser settings where they differ from TrainConfig's (the CLI's and the retrain YAML's
#: defaults both come from here): short, a low constant learning rate after the warm-up, a faster EMA
FINETUNE_TRAIN_DEFAULTS: dict[str, Any] = {"steps": 500, "batch_size": 8, "lr": 1e-5, "warmup": 50,
                                           "schedule": "constant", "ema_decay": 0.99, "ckpt_every": 100}


@dataclass(frozen=True)
class FinetuneConfig(DictConfig):
    """What fine-tuning does (the optimiser settings are a TrainConfig). sigma (and the logged recon_mse)
    are in the flow's units: normalised, or, for a model with a per-task transform (docs/protocol.md §10),
    its whitened targets. control: train the same model by flow matching instead (the fine-tune's
    continued-pretraining control; coupling, k_steps, sigma and cfm_weight are then unused)."""

    mode: str = "mle"
    coupling: str = "inversion"
    k_steps: int = 16
    inversion_steps: int = 32
    sigma: float = 0.1
    learn_sigma: bool = False
    cfm_weight: float = 0.0
    grad: str = "backprop"
    train_base: bool = False
    gav: dict[str, Any] | None = None
    control: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (("mode", self.mode, MODES), ("coupling", self.coupling, COUPLINGS),
                                     ("grad", self.grad, GRADS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.k_steps < 1 or self.inversion_steps < 1:
            raise ValueError("k_steps and inversion_steps must be >= 1")
        if not self.sigma > 0:
            raise ValueError("sigma must be > 0")
        if self.cfm_weight < 0:
            raise ValueError("cfm_weight must be >= 0")



@torch.no_grad()
def invert(model: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
    """Noise z (B, n_tgt, D) that the flow of `model` carries to batch.yt: the ODE backwards from t = 1
    to t = 0 with `steps` midpoint steps."""
    ctx = model.encode_context(batch.xc, batch.yc)
    sol = solve(lambda t, s: (model.velocity(ctx, batch.xt, s[0], t),), (batch.yt,), 1.0, 0.0,
                SolverConfig("midpoint", steps))
    return sol.state[0]


def euler_decode(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, z: torch.Tensor,
                 k: int, grad: str = "backprop") -> torch.Tensor:
    """K explicit Euler steps from z (B, n_tgt, D) at t = 0 to t = 1, differentiable in the model."""
    if grad == "adjoint":
        params = tuple(p for p in model.parameters() if p.requires_grad)
        f = lambda t, s: (model(xc, yc, xt, s[0], t),)  # noqa: E731  (context re-encoded: its gradient too)
        return solve(f, (z,), 0.0, 1.0, SolverConfig("euler", k, adjoint=True), params=params).state[0]
    ctx = model.encode_context(xc, yc)
    y = z
    for i in range(k):
        t = torch.tensor(i / k, dtype=z.dtype, device=z.device)
        step = lambda y, t=t: y + model.velocity(ctx, xt, y, t) / k  # noqa: E731
        y = checkpoint(step, y, use_reentrant=False) if grad == "checkpoint" else step(y)
    return y


class Reconstruction(nn.Module):
    """The fine-tuning objective as one module (so DDP sees every parameter in forward): the model and
    the per-variable log sigma. forward -> (loss, reconstruction MSE, CFM loss) scalars."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, y_dim: int,
                 log_sigma: nn.Parameter | None = None) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.log_sigma = log_sigma if log_sigma is not None else nn.Parameter(
            torch.full((y_dim,), math.log(cfg.sigma)), requires_grad=cfg.learn_sigma)

    def forward(self, batch: TaskBatch, z: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        xhat = euler_decode(self.model, batch.xc, batch.yc, batch.xt, z, cfg.k_steps, cfg.grad)
        r = (batch.yt - xhat) / self.log_sigma.exp()
        nll = (0.5 * r.pow(2) + self.log_sigma + 0.5 * math.log(2 * math.pi)).mean()
        mse = (batch.yt - xhat).pow(2).mean()
        cfm = torch.zeros((), device=z.device)
        if cfg.cfm_weight > 0:
            path = model_path(self.model, batch.yt, gen)
            cfm = flow_matching_loss(self.model(batch.xc, batch.yc, batch.xt, path.yt, path.t), path)
        return nll + cfg.cfm_weight * cfm, mse.detach(), cfm.detach()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values (in name order): equal iff the weights are."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: what a fine-tune and its control must share (train_config fields): the optimiser steps, the batch and the
#: task stream (the sampler is a function of the seed, the context and target sizes and the batch size)
PAIRED_TRAIN_FIELDS = ("steps", "batch_size", "n_ctx_min", "n_ctx_max", "n_tgt", "seed", "path_draws")


def check_same_start(finetune_ckpt: dict[str, Any], control_ckpt: dict[str, Any]) -> None:
    """Refuse (ValueError) to pair a fine-tune with a control that did not start from the same pretrained
    weights (`start_base_sha256`; and, for a control of the same model build, `start_sha256`), or that ran
    other optimiser steps, batches or task stream, or that is not a control at all."""
    ft, ctl = finetune_ckpt.get("finetune_config") or {}, control_ckpt.get("finetune_config") or {}
    if ft.get("control") or not ctl.get("control"):
        raise ValueError("check_same_start needs a fine-tune and a control (finetune_config.control)")
    for key in ("start_base_sha256",):
        a, b = finetune_ckpt.get(key), control_ckpt.get(key)
        if a is None or a != b:
            raise ValueError(f"the control did not start from the fine-tune's weights ({key}: "
                             f"{str(a)[:12]}... vs {str(b)[:12]}...)")
    if ft.get("mode") == ctl.get("mode") and ft.get("gav") == ctl.get("gav") and \
            finetune_ckpt.get("start_sha256") != control_ckpt.get("start_sha256"):
        raise ValueError("the control builds the same model as the fine-tune but started from other weights "
                         "(start_sha256 differs)")
    ta, tb = finetune_ckpt.get("train_config") or {}, control_ckpt.get("train_config") or {}
    diff = [k for k in PAIRED_TRAIN_FIELDS if ta.get(k) != tb.get(k)]
    if diff or finetune_ckpt.get("step") != control_ckpt.get("step"):
        raise ValueError(f"the control ran other optimiser steps or tasks than the fine-tune: {diff or ['step']}")


def build_finetune_model(base: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """The model fine-tuning trains: the base itself (mle) or base + GAV residual (gav)."""
    if cfg.mode == "mle":
        return base
    from flownp.core.gav import GAVConfig, GAVFlowNP

    return GAVFlowNP(base, GAVConfig.from_dict(cfg.gav or {}), train_base=cfg.train_base)


class FineTuner(Trainer):
    """The pretraining loop with the reconstruction objective; checkpoints record the base they came from."""

    def __init__(self, store: Store, out: str | Path, base_path: str | Path, ft: FinetuneConfig,
                 cfg: TrainConfig, dist: Any = None) -> None:
        if cfg.path_draws != 1:  # the objectives here draw their own paths; a control must match its fine-tune
            raise ValueError("path_draws applies to flow-matching pretraining only; fine-tuning and its control "
                             "run with path_draws 1")
        self.ft, self.base_path = ft, Path(base_path)
        self.base_sha256 = sha256_file(base_path)  # what this run starts from (resume checks it)
        self.base_ckpt = load_checkpoint(base_path)
        if self.base_ckpt.get("kind") not in ("pretrain", "finetune"):
            raise ValueError(f"{base_path}: a FlowNP checkpoint is needed, not a {self.base_ckpt.get('kind')!r}")
        if self.base_ckpt.get("store_manifest_sha256") != store.manifest_sha256 and \
                self.base_ckpt.get("normalizer") != store.normalizer.to_dict():
            raise ValueError(f"{base_path} was trained with another normalisation than this store's")
        super().__init__(store, out, None, cfg, dist)
        self.normalizer = type(store.normalizer).from_dict(self.base_ckpt["normalizer"])

    def build(self, _: Any) -> tuple[nn.Module, Any, str]:
        from flownp.core.gav import GAVFlowNP

        base = model_from_checkpoint(self.base_ckpt).to(self.cfg.device)
        if isinstance(base, GAVFlowNP):
            if self.ft.mode == "gav":
                raise ValueError(f"{self.base_path} already has a GAV residual; fine-tune it with --mode mle "
                                 "or start the GAV from its pretrained base")
            base.requires_grad_(True)  # MLE fine-tuning of a GAV model tunes all of it
        # the coupling's frozen copy of the pretrained field
        self.frozen = model_from_checkpoint(self.base_ckpt).to(self.cfg.device).requires_grad_(False)
        self.start_base_sha256 = state_dict_sha256(base.state_dict())  # the pretrained weights as loaded
        model = build_finetune_model(base, self.ft)
        self.start_sha256 = state_dict_sha256(model.state_dict())  # everything the run trains, at step 0
        return model, (fm_loss if self.ft.control else self.objective_fn), "finetune"

    def training_module(self) -> nn.Module:
        if self.ft.control:  # flow matching: the model itself, as in pretraining
            return self.model
        return Reconstruction(self.model, self.ft, self.model.config.y_dim)

    def param_groups(self) -> list[dict[str, Any]]:
        """The model's parameters, and log sigma apart: no weight decay (it would pull sigma towards 1) and
        100x the model's learning rate (at fine-tuning rates sigma would otherwise barely move)."""
        model = [p for p in self.model.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": model}]
        if not self.ft.control and self.module.log_sigma.requires_grad:
            groups.append({"params": [self.module.log_sigma], "weight_decay": 0.0, "lr_scale": 100.0})
        return groups

    def coupling(self, batch: TaskBatch, gen: torch.Generator) -> torch.Tensor:
        if self.ft.coupling == "inversion":
            return invert(self.frozen, batch, self.ft.inversion_steps)
        return torch.randn(batch.yt.shape, generator=gen, dtype=batch.yt.dtype).to(batch.yt.device)

    def objective_fn(self, net: nn.Module, batch: TaskBatch, gen: torch.Generator, bf16: bool) -> torch.Tensor:
        batch = flow_space(self.frozen, batch)  # reconstructions are of the flow's own targets
        z = self.coupling(batch, gen)
        with torch.autocast(batch.yt.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, mse, cfm = net(batch, z, gen)
        self.last_parts = {"recon_mse": float(mse), "cfm": float(cfm)}
        return loss.float()

    def validate(self) -> float:
        if self.ft.control:  # the flow-matching loss, as pretraining validates
            return super().validate()
        view = Reconstruction(self.ema, self.ft, self.model.config.y_dim, self.module.log_sigma)
        return validation_loss(view, self.val_sampler, self.cfg.val_batches, str(self.device), self.cfg.seed,
                               self.objective_fn)

    def train_step(self) -> dict[str, float]:
        rec = super().train_step()
        if self.ft.control:
            return rec
        return {**rec, **self.last_parts, "sigma": self.module.log_sigma.exp().tolist()}

    def payload(self) -> dict[str, Any]:
        p = super().payload()
        p["model_config"] = self.model.config.to_dict()
        gav = getattr(self.model, "gav_config", None)
        if gav is not None:  # a GAV model (new, or an MLE fine-tune of one) rebuilds with its residual
            p["gav_config"] = gav.to_dict()
        base_min = lineage_n_ctx_min(self.base_ckpt)
        p.update({
            "finetune_config": self.ft.to_dict(),
            "log_sigma": None if self.ft.control else self.module.log_sigma.detach().cpu(),
            "start_sha256": self.start_sha256, "start_base_sha256": self.start_base_sha256,
            "base_checkpoint": {"path": str(self.base_path), "sha256": self.base_sha256,
                                "kind": self.base_ckpt.get("kind"), "step": self.base_ckpt.get("step"),
                                "n_ctx_min": base_min},
        })
        # the smallest context over the whole lineage (this stage's task_config holds only its own)
        own_min = lineage_n_ctx_min({"task_config": p.get("task_config")})
        p["trained_n_ctx_min"] = min((m for m in (own_min, base_min) if m is not None), default=None)
        return p

    def resume(self, path: str | Path) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        if ck.get("finetune_config") != self.ft.to_dict():
            raise ValueError(f"{path}: fine-tuning settings differ from this run's")
        if ck.get("base_checkpoint", {}).get("sha256") != self.base_sha256:
            raise ValueError(f"{path} was fine-tuned from another base than {self.base_path} (its sha256 "
                             "changed); start a new run directory")
        if ck.get("start_sha256", self.start_sha256) != self.start_sha256:
            raise ValueError(f"{path} started from other weights than this run builds (start_sha256 differs)")
        super().resume(path)
        if ck.get("log_sigma") is not None:
            with torch.no_grad():
                self.module.log_sigma.copy_(ck["log_sigma"])


def finetune(base: str | Path, data: str | Path, out: str | Path, ft: FinetuneConfig | None = None,
             cfg: TrainConfig | None = None, *, resume: bool = False, progress: bool = True,
             max_minutes: float | None = None) -> dict[str, Any]:
    """Fine-tune the checkpoint `base` on the store at `data`, writing log.jsonl, last.pt, best.pt to `out`."""
    ft = ft or FinetuneConfig()
    cfg = cfg or TrainConfig(lr=1e-5, warmup=50, schedule="constant", ema_decay=0.99, batch_size=8)
    dist = init_from_env(cfg.device)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": rank_device(cfg.device, dist)})
    tuner = FineTuner(Store.open(data), out, base, ft, cfg, dist)
    if resume and (Path(out) / "last.pt").exists():
        tuner.resume(Path(out) / "last.pt")
    return tuner.run(progress, max_minutes=max_minutes)
