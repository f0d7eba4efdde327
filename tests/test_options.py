"""The training options come from the config dataclasses: every field (one added later too) is an option
and a retrain YAML key with the dataclass's default; ranges and derived widths follow one rule."""

from __future__ import annotations

import dataclasses

from flownp.core.config import ModelConfig
from flownp.jobs import options
from flownp.jobs.finetune import FINETUNE_TRAIN_DEFAULTS
from flownp.jobs.retrain import FinetuneSpec, PretrainSpec
from flownp.jobs.train import TrainConfig


def test_every_model_field_is_an_option_with_its_default():
    opts = {o.name: o for o in options.MODEL.options()}
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("x_dim", "y_dim"):
            continue
        assert f.name in opts, f.name
        if f.name not in ("d_ff", "embed_hidden"):
            assert opts[f.name].default == f.default


def test_a_field_added_later_appears_on_the_cli_and_in_the_yaml():
    @dataclasses.dataclass(frozen=True)
    class Grown(ModelConfig):  # type: ignore[misc]
        base: str = "normal"

    g = options.Group(Grown, exclude=("x_dim", "y_dim"))
    assert "base" in {o.name for o in g.options()}
    assert [p.name for p in options.cli_parameters(g)].count("base") == 1
    assert g.build({"base": "gp"}).base == "gp"


def test_ranges_and_derived_widths():
    t = options.TRAIN.build({"n_ctx": "50-1000"})
    assert (t.n_ctx_min, t.n_ctx_max) == (50, 1000)
    assert options.TRAIN.build({}) == TrainConfig()
    m = options.MODEL.build({"d_model": 32})
    assert (m.d_ff, m.embed_hidden) == (64, 32)
    assert options.MODEL.build({}) == ModelConfig()


def test_cli_and_yaml_share_their_defaults():
    assert PretrainSpec().values()["n_ctx"] == "2-1199" == options.TRAIN.options()[
        [o.name for o in options.TRAIN.options()].index("n_ctx")].default
    ft = FinetuneSpec().values()
    for k, v in FINETUNE_TRAIN_DEFAULTS.items():
        assert ft[k] == v, k
    assert options.FINETUNE_TRAIN.build(ft) == TrainConfig(**{**FINETUNE_TRAIN_DEFAULTS, "n_ctx_min": 2,
                                                              "n_ctx_max": 1199})
    assert options.finetune_config({**ft, "mode": "gav", "gav_kind": "contracting"}).gav["kind"] == "contracting"
