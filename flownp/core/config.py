"""Model configuration: a dataclass that round-trips to a plain dict (stored in every checkpoint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """FlowNP transformer settings.

    arch:     "reference": the published model (all tokens attend to all, post-LN nn.TransformerEncoder);
              "cached":    context tokens attend to the context only, so their per-layer keys/values are
                           computed once per ODE solve and reused at every step and sample.
    targets:  "joint" (targets attend to the context and to each other: samples are spatially coherent)
              or "independent" (each target attends to the context and itself: its flow depends only on
              itself and the context, the Jacobian is block diagonal and the exact trace costs y_dim
              vector-Jacobian products). "reference" is always joint.
    encoding: "reference": sin/cos at w_k = pi * 2^(k-2), k = 0..n_freqs-1 for x1, x2 and t (40 each, as
              published; the high ones alias in float32); "lowfreq": geometric frequencies from
              pi/4 to pi * 2^(max_log2) for space, and a few low ones for time (a stiff time embedding
              multiplies adaptive-solver steps).
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

    def __post_init__(self) -> None:
        if self.arch not in ("reference", "cached"):
            raise ValueError(f"arch must be 'reference' or 'cached', got {self.arch!r}")
        if self.targets not in ("joint", "independent"):
            raise ValueError(f"targets must be 'joint' or 'independent', got {self.targets!r}")
        if self.arch == "reference" and self.targets != "joint":
            raise ValueError("arch='reference' generates targets jointly; use arch='cached' for independent")
        if self.encoding not in ("reference", "lowfreq"):
            raise ValueError(f"encoding must be 'reference' or 'lowfreq', got {self.encoding!r}")
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
