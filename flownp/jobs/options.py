"""One definition per option: the training options live in their dataclasses (ModelConfig, TrainConfig,
FinetuneConfig, GAVConfig, NeuralBaselineConfig), and the `flownp` CLI and the retrain YAML are built
from them here, with no hand mapping and no second set of defaults (LFMConfig and DistillConfig too:
`flownp train-lfm`, `flownp distill`).

A `Group` names a dataclass, an optional prefix (`gav_kind` -> GAVConfig.kind), the stage's defaults
where they differ from the dataclass's (fine-tuning's optimiser, `FINETUNE_TRAIN_DEFAULTS`), and rules:
- a pair of int fields `X_min`, `X_max` is one option `X` written `MIN-MAX` (`--n-ctx 50-1000`);
- a `derived` field defaults to a function of the others (`d_ff = 2 * d_model`), shown as None;
- `exclude`d fields are fixed by the data (`x_dim`, `y_dim`) or filled by the job.
Every other field, including one added to a dataclass later, becomes an option `--field-name` (a bool
one a flag) and a YAML key of the same name with the same default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import MISSING, dataclass, field
from typing import Annotated, Any, Callable, Mapping, Optional

from ingest.parsing import format_range, parse_range

HELP: dict[str, str] = {  # option help; a field without an entry is described by its dataclass name
    "steps": "Optimizer steps.", "batch_size": "Tasks per step.", "lr": "Peak learning rate.",
    "warmup": "Warm-up steps.", "n_ctx": "Context size range MIN-MAX.",
    "n_tgt": "Targets per task (default: all the rest).", "seed": "Seed.", "device": "cpu or cuda.",
    "bf16": "bf16 autocast (CUDA; slow on CPU).", "ckpt_every": "Checkpoint (and validate) every N steps.",
    "ema_decay": "EMA decay of the weights.", "schedule": "cosine or constant after the warm-up.",
    "path_draws": "Flow-matching (noise, time) draws per target and step.",
    "arch": "cached, pointwise (value and time in the head only; independent targets) or reference.",
    "head_layers": "Linear layers of the velocity head MLP.",
    "head_neighbours": "pointwise: nearest context points the head attends to (0: none).",
    "value_layers": "pointwise: last transformer blocks that see the target's value and time (0: none).", "targets": "joint or independent.", "encoding": "lowfreq or reference.",
    "d_model": "Transformer width.", "n_layers": "Transformer layers (baselines: CNP MLP depth, TNP-A layers).",
    "d_ff": "Feed-forward width (default: 2 * d_model).", "embed_hidden": "Embedding MLP width (default: d_model).",
    "kind": "cnp or tnpa.", "mode": "mle (tune the whole model) or gav (add a GAV residual).",
    "coupling": "inversion (frozen base, reverse ODE) or random.",
    "k_steps": "Euler steps of the differentiated decoder (K).", "inversion_steps": "Midpoint steps of the inversion.",
    "sigma": "Observation std (normalised units); initial if learned.", "learn_sigma": "Learn a per-variable sigma.",
    "cfm_weight": "Weight of a flow-matching regulariser.",
    "grad": "backprop, checkpoint (less memory) or adjoint (least).",
    "train_base": "gav: also tune the base model.",
    "control": "The continued-pretraining control: the same model, steps and tasks, trained by flow matching.", "gav_kind": "gav: schur (Hurwitz), contracting, or mlp (ablation).",
    "gav_centre": "gav: mlp (on the mean-pooled context summary; the ablation) or local (a small backbone copy "
                  "attending to the context per target point).",
    "gav_centre_layers": "gav local centre: transformer layers.", "gav_centre_width": "gav local centre: width.",
    "gav_centre_heads": "gav local centre: attention heads.",
    "gav_cayley_rank": "gav: low-rank skew factor (rank <= 2r) through Sherman-Morrison-Woodbury; default dense.",
    "n_blocks": "LFM: sub-flows N (steps is per block).", "gamma_c": "LFM: first OU step gamma_1 = c.",
    "gamma_rho": "LFM: OU step ratio, gamma_n = c rho^(n-1).",
    "push_method": "LFM: fixed-step solver pushing targets through the trained blocks.",
    "push_steps": "LFM: its steps per block.", "group": "distill: teacher blocks/segments per one-step map (k).",
    "segments": "distill: time segments N of a global-flow teacher (N' = N / k maps).",
    "teacher_method": "distill: the teacher's solver for the pairs.", "teacher_steps": "distill: its steps per block/segment.",
}


@dataclass(frozen=True)
class Option:
    """One option: its flat name (CLI `--name`, YAML key), type, default, and the fields it fills."""

    name: str
    type: Any
    default: Any
    help: str
    fields: tuple[str, ...]  # one field, or (X_min, X_max) for a range
    required: bool = False


@dataclass(frozen=True)
class Group:
    cls: type
    prefix: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    derived: Mapping[str, Callable[[dict[str, Any]], Any]] = field(default_factory=dict)
    required: tuple[str, ...] = ()

    def _default(self, f: dataclasses.Field) -> Any:
        if f.name in self.defaults:
            return self.defaults[f.name]
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:  # type: ignore[misc]
            return f.default_factory()  # type: ignore[misc]
        return None

    def options(self) -> list[Option]:
        hints = typing.get_type_hints(self.cls)
        fs = [f for f in dataclasses.fields(self.cls) if f.name not in self.exclude]
        names = {f.name for f in fs if hints[f.name] in (int, "int")}  # int pairs X_min, X_max fold
        out: list[Option] = []
        for f in fs:
            if f.name.endswith("_max") and f.name in names and f.name[:-4] + "_min" in names:
                continue  # folded into the range option below
            if f.name.endswith("_min") and f.name in names and f.name[:-4] + "_max" in names:
                base, hi = f.name[:-4], f.name[:-4] + "_max"
                d = format_range(self._default(f), self._default(next(g for g in fs if g.name == hi)))
                out.append(Option(self.prefix + base, str, d, self._help(base), (f.name, hi)))
                continue
            typ = hints[f.name]
            if f.name in self.derived:
                typ, default = Optional[_plain(typ)], None
            else:
                default = self._default(f)
            out.append(Option(self.prefix + f.name, typ, default, self._help(f.name), (f.name,),
                              f.name in self.required))
        return out

    def _help(self, name: str) -> str:
        return HELP.get(self.prefix + name) or HELP.get(name) or f"{self.cls.__name__}.{name}"

    def kwargs(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Dataclass keyword arguments from flat option values (missing ones take the group's defaults)."""
        kw: dict[str, Any] = {}
        for o in self.options():
            v = values.get(o.name, o.default)
            if len(o.fields) == 2:
                kw[o.fields[0]], kw[o.fields[1]] = parse_range(v)
            elif v is not None or o.fields[0] not in self.derived:
                kw[o.fields[0]] = v
        for name, rule in self.derived.items():
            if kw.get(name) is None:
                kw[name] = rule(kw)
        return kw

    def build(self, values: Mapping[str, Any]) -> Any:
        return self.cls(**self.kwargs(values))


def _plain(typ: Any) -> Any:
    """int | None -> int; int -> int."""
    args = typing.get_args(typ)
    rest = [a for a in args if a is not type(None)]
    return rest[0] if type(None) in args and len(rest) == 1 else typ


# ---- the CLI -----------------------------------------------------------------------------------------
def _typer_type(typ: Any) -> Any:
    """int | None -> Optional[int] (what typer reads); plain types pass."""
    args = typing.get_args(typ)
    if args and type(None) in args:
        return Optional[_plain(typ)]
    return typ


def cli_parameters(*groups: Group) -> list[inspect.Parameter]:
    """typer parameters (keyword-only, `--field-name`) for every option of the groups."""
    import typer

    params, seen = [], set()
    for g in groups:
        for o in g.options():
            if o.name in seen:
                raise ValueError(f"option {o.name} is defined twice")
            seen.add(o.name)
            flag = "--" + o.name.replace("_", "-")
            if o.type is bool:
                decl = typer.Option(f"{flag}/--no-{flag[2:]}" if o.default else flag, help=o.help)
            else:
                decl = typer.Option(flag, help=o.help)
            default = inspect.Parameter.empty if o.required else o.default
            params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[_typer_type(o.type), decl]))
    return params


def command(app: Any, name: str, doc: str, own: list[inspect.Parameter], groups: tuple[Group, ...],
            run: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
    """Register `name` on the typer `app`: its own parameters `own`, then every option of `groups`; `run`
    is called with all values by name (build the configs with `Group.build` / the stage builders)."""
    params = own + cli_parameters(*groups)

    def cmd(**kw: Any) -> None:
        run(kw)

    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__doc__ = doc
    cmd.__name__ = name.replace("-", "_")
    app.command(name)(cmd)
    return cmd


# ---- the retrain YAML --------------------------------------------------------------------------------
#: bounds the job file checks when it is read (pydantic Field constraints), before any stage runs
BOUNDS: dict[str, dict[str, float]] = {"steps": {"ge": 1}, "batch_size": {"ge": 1}, "lr": {"gt": 0},
                                       "warmup": {"ge": 0}, "k_steps": {"ge": 1}, "inversion_steps": {"ge": 1},
                                       "n_tgt": {"ge": 1}}


def yaml_fields(*groups: Group) -> dict[str, tuple[Any, Any]]:
    """pydantic `create_model` field definitions (type, Field(default, bounds)) for every option."""
    from pydantic import Field

    return {o.name: (_typer_type(o.type), Field(o.default, **BOUNDS.get(o.name, {})))
            for g in groups for o in g.options()}


# ---- the stages: which dataclasses make each job's options, with what defaults ------------------------
def _stages() -> dict[str, Group]:
    from flownp.core.config import ModelConfig
    from flownp.core.gav import GAVConfig
    from flownp.core.lfm import DistillConfig, LFMConfig
    from flownp.jobs.baselines.neural import NeuralBaselineConfig
    from flownp.jobs.finetune import FINETUNE_TRAIN_DEFAULTS, FinetuneConfig
    from flownp.jobs.train import TrainConfig

    width = {"d_ff": lambda kw: 2 * kw["d_model"], "embed_hidden": lambda kw: kw["d_model"]}  # the shape rule
    data_fixed = ("x_dim", "y_dim")  # the data's: 2 coordinates, 4 variables
    return {
        "model": Group(ModelConfig, exclude=data_fixed, derived=width),
        "train": Group(TrainConfig),
        "baseline": Group(NeuralBaselineConfig, exclude=data_fixed, derived={"d_ff": width["d_ff"]},
                          required=("kind",)),
        "finetune": Group(FinetuneConfig, exclude=("gav",)),
        "gav": Group(GAVConfig, prefix="gav_"),
        "finetune_train": Group(TrainConfig, defaults=FINETUNE_TRAIN_DEFAULTS),
        "lfm": Group(LFMConfig),
        "distill": Group(DistillConfig),
    }


STAGES = _stages()
MODEL, TRAIN, BASELINE = STAGES["model"], STAGES["train"], STAGES["baseline"]
FINETUNE, GAV, FINETUNE_TRAIN = STAGES["finetune"], STAGES["gav"], STAGES["finetune_train"]
LFM, DISTILL = STAGES["lfm"], STAGES["distill"]


def finetune_config(values: Mapping[str, Any]) -> Any:
    """FinetuneConfig from flat values, with its GAVConfig (as a dict) when mode is gav."""
    ft = FINETUNE.build(values)
    return dataclasses.replace(ft, gav=GAV.build(values).to_dict() if ft.mode == "gav" else None)
