"""The MLP activation setting: recorded and rebuilt, old checkpoints stay ReLU, and the reason it exists: a
ReLU head whose units are all negative passes no gradient (dead, as in the 2026-12 default), a SiLU one does."""

from __future__ import annotations

import pytest
import torch

from flownp.checkpoint import load_checkpoint, model_from_checkpoint
from flownp.core.config import ModelConfig
from flownp.core.model import FlowNP, head_units_alive
from flownp.default_model import default_paths

TINY = dict(targets="independent", d_model=16, n_heads=2, n_layers=1, d_ff=16, embed_hidden=16, head_hidden=8,
            space_freqs=2, time_freqs=2, velocity="residual")


def test_activation_round_trips_and_bad_values_are_refused() -> None:
    cfg = ModelConfig(**TINY, activation="silu")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(FlowNP(cfg).head[1], torch.nn.SiLU) and isinstance(FlowNP(cfg).embed[1], torch.nn.SiLU)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(**TINY, activation="tanh")


def test_a_checkpoint_without_the_setting_rebuilds_as_relu() -> None:
    """Checkpoints written before the setting existed (the first default among them) rebuild as ReLU; the
    shipped default records SiLU and rebuilds as SiLU."""
    ck = load_checkpoint(default_paths()[0])
    assert ck["model_config"]["activation"] == "silu"
    assert isinstance(model_from_checkpoint(ck).head[1], torch.nn.SiLU)
    old = {**ck, "model_config": {k: v for k, v in ck["model_config"].items() if k != "activation"}}
    assert isinstance(model_from_checkpoint(old).head[1], torch.nn.ReLU)


@pytest.mark.parametrize("activation, alive", [("relu", 0.0), ("silu", 1.0)])
def test_a_head_pushed_negative_is_dead_with_relu_and_alive_with_silu(activation: str, alive: float) -> None:
    torch.manual_seed(0)
    m = FlowNP(ModelConfig(**TINY, activation=activation))
    with torch.no_grad():
        m.head[0].bias.fill_(-5.0)  # every hidden pre-activation far below zero
        m.head[0].weight.mul_(1e-3)
        m.head[-1].weight.fill_(0.1)
    g = torch.Generator().manual_seed(1)
    xc, yc, xt = torch.rand(2, 30, 2, generator=g), torch.randn(2, 30, 4, generator=g), torch.rand(2, 10, 2, generator=g)
    assert head_units_alive(m, xc, yc, xt, generator=g) == alive
    ctx = m.encode_context(xc, yc)
    m.velocity(ctx, xt, torch.randn(2, 10, 4, generator=g), 0.5).sum().backward()
    grad = m.head[0].weight.grad.abs().sum().item()
    assert (grad == 0.0) if activation == "relu" else (grad > 0.0)  # a dead head learns nothing


def test_the_default_recipe_rebuilds_the_shipped_model_and_the_one_before() -> None:
    """scripts/train_default.py: its default recipe is the shipped model's config; --arch cached gives the
    model before it (no value layers, which cached refuses)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_default.py"
    spec = importlib.util.spec_from_file_location("train_default", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shipped = ModelConfig.from_dict(load_checkpoint(default_paths()[0])["model_config"])
    assert mod.recipe() == shipped
    before = mod.recipe("cached")
    assert before.arch == "cached" and before.value_layers == 0 and before.head_layers == ModelConfig().head_layers
