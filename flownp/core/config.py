"""Model configuration: a dataclass that round-trips to a plain dict (stored in every checkpoint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


ACTIVATIONS = ("relu", "silu")
ARCHS = ("reference", "cached", "pointwise")


@dataclass(frozen=True)
class ModelConfig:
    """FlowNP transformer settings.

    arch:     "reference": the published model (all tokens attend to all, post-LN nn.TransformerEncoder);
              "cached":    context tokens attend to the context only, so their per-layer keys/values are
                           computed once per ODE solve and reused at every step and sample.
              "pointwise": as "cached" with independent targets, but a target's token carries only its
                           location: its value y_t and the time t enter the head MLP with the transformer's
                           output for that location. The transformer runs once per solve (not per step),
                           and the exact divergence is y_dim vector-Jacobian products through the head
                           alone (docs/protocol.md §7.1). `head_neighbours` k > 0 gives the head one
                           attention over the k nearest context points (their final context states and
                           offsets), queried by the state, time and location summary: a value-dependent
                           look at the neighbourhood at the cost of k keys, not n_ctx, per step.
                           `value_layers` m > 0: the last m blocks take the location token plus an
                           embedding of (t, y_t) and attend to the context again, value-dependent: each
                           step costs m of the n_layers blocks (and the divergence passes through them).
    targets:  "joint" (targets attend to the context and to each other: samples are spatially coherent)
              or "independent" (each target attends to the context and itself: its flow depends only on
              itself and the context, the Jacobian is block diagonal and the exact trace costs y_dim
              vector-Jacobian products). "reference" is always joint.
    encoding: "reference": sin/cos at w_k = pi * 2^(k-2), k = 0..n_freqs-1 for x1, x2 and t (40 each, as
              published; the high ones alias in float32); "lowfreq": geometric frequencies from
              pi/4 to pi * 2^(max_log2) for space, and a few low ones for time (a stiff time embedding
              multiplies adaptive-solver steps).
    standardise: "none" (the store's normalised values as they are: the reference protocol) or "context"
              (per task and variable, the context's median and robust spread, applied to context and
              targets; docs/protocol.md §10).
    base:     "standard" (the flow starts from N(0, I) on the targets) or "gp" (it runs on targets whitened
              by a per-variable GP posterior fitted on the context, so a zero velocity is that GP).
    whitening: with base="gp": "symmetric" (Sigma^-1/2, joint, permutation equivariant) or "diagonal"
              (per-point standard scores).
    gp_kernels: comma-separated kernel families the GP fit chooses from by marginal likelihood.
    gp_fit_points: size of the (order-invariant) context subset the GP hyperparameters are fitted on.
    gp_ell_min, gp_ell_max, gp_n_ell, gp_noise_ratios: the fit's grid (length scales log-spaced in model
              coordinates, noise variances as fractions of the signal variance).
    velocity: "network" (the network is the velocity of the linear path) or "residual" (it is the velocity
              in the frame u = y / sigma(t), where the path between two N(0, I) laws stands still; its last
              layer starts at zero, so the untrained model is exactly its base; flownp.core.paths).
    activation: of the token-embedding and head MLPs, "relu" (the reference) or "silu". With
              velocity="residual" a ReLU head can die: its last layer starts at zero and the target is nearly
              constant, and in the shipped 2026-12 default every one of the head's 128 ReLU units was dead,
              which left a constant velocity (docs/results.md §5.5); SiLU has no dead region.
    """

    arch: str = "cached"
    targets: str = "joint"
    encoding: str = "lowfreq"
    x_dim: int = 2
    y_dim: int = 4
    n_freqs: int = 40          # reference encoding: frequencies per scalar
    space_freqs: int = 16      # lowfreq encoding: frequencies per coordinate
    space_max_log2: float = 4.0
    time_freqs: int = 6        # lowfreq encoding: frequencies for t (pi/4 .. pi * 2^3)
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 6
    d_ff: int = 128
    embed_hidden: int = 64
    embed_layers: int = 4      # linear layers of the token-embedding MLP
    head_hidden: int = 128
    head_layers: int = 2       # linear layers of the head MLP
    head_neighbours: int = 0   # arch='pointwise': context points the head attends to (0: none)
    value_layers: int = 0      # arch='pointwise': last transformer blocks that see the target's value and t
    standardise: str = "none"
    base: str = "standard"
    whitening: str = "symmetric"
    gp_kernels: str = "matern32,matern52"
    gp_fit_points: int = 256
    gp_ell_min: float = 0.5
    gp_ell_max: float = 60.0
    gp_n_ell: int = 12
    gp_noise_ratios: str = "1e-5,1e-4,1e-3,1e-2,1e-1"
    standardise_floor: float = 0.05
    velocity: str = "network"
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.targets not in ("joint", "independent"):
            raise ValueError(f"targets must be 'joint' or 'independent', got {self.targets!r}")
        if self.arch == "reference" and self.targets != "joint":
            raise ValueError("arch='reference' generates targets jointly; use arch='cached' for independent")
        if self.arch == "pointwise" and self.targets != "independent":
            raise ValueError("arch='pointwise' feeds each target's value to its own head only: it needs "
                             "targets='independent' (use arch='cached' for joint targets)")
        if self.head_neighbours < 0 or (self.head_neighbours and self.arch != "pointwise"):
            raise ValueError("head_neighbours must be >= 0, and > 0 only with arch='pointwise'")
        if self.value_layers < 0 or (self.value_layers and self.arch != "pointwise") \
                or self.value_layers > self.n_layers:
            raise ValueError("value_layers must be in 0..n_layers, and > 0 only with arch='pointwise'")
        if self.head_layers < 2:
            raise ValueError("head_layers must be >= 2")
        if self.encoding not in ("reference", "lowfreq"):
            raise ValueError(f"encoding must be 'reference' or 'lowfreq', got {self.encoding!r}")
        if self.standardise not in ("none", "context"):
            raise ValueError(f"standardise must be 'none' or 'context', got {self.standardise!r}")
        if self.base not in ("standard", "gp"):
            raise ValueError(f"base must be 'standard' or 'gp', got {self.base!r}")
        if self.whitening not in ("symmetric", "diagonal"):
            raise ValueError(f"whitening must be 'symmetric' or 'diagonal', got {self.whitening!r}")
        kinds = [k for k in self.gp_kernels.split(",") if k]
        if not kinds or any(k not in ("se", "matern52", "matern32") for k in kinds):
            raise ValueError(f"gp_kernels must list se, matern52 or matern32, got {self.gp_kernels!r}")
        if self.gp_fit_points < 8:
            raise ValueError("gp_fit_points must be >= 8")
        if not (0 < self.gp_ell_min < self.gp_ell_max) or self.gp_n_ell < 1:
            raise ValueError("need 0 < gp_ell_min < gp_ell_max and gp_n_ell >= 1")
        try:
            ratios = [float(r) for r in self.gp_noise_ratios.split(",") if r]
        except ValueError:
            ratios = []
        if not ratios or any(not r > 0 for r in ratios):
            raise ValueError(f"gp_noise_ratios must be positive numbers, got {self.gp_noise_ratios!r}")
        if not self.standardise_floor > 0:
            raise ValueError("standardise_floor must be > 0")
        if self.velocity not in ("network", "residual"):
            raise ValueError(f"velocity must be 'network' or 'residual', got {self.velocity!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")

    @classmethod
    def reference(cls) -> "ModelConfig":
        """The published FlowNP (docs/protocol.md §7): about 238K parameters."""
        return cls(arch="reference", targets="joint", encoding="reference")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {sorted(unknown)}")
        return cls(**d)
