"""Service settings (pydantic-settings): environment variables with the prefix FLOWNP_, e.g.
FLOWNP_CHECKPOINT=/models/best.pt FLOWNP_CHECKPOINT_SHA256=<hex> FLOWNP_API_KEYS_FILE=/run/secrets/keys.

Models: a checkpoint (its sha256 given here or in a sidecar `<checkpoint>.sha256`), and/or a registry
(flownp.registry: sha256 from each version's manifest). Neither, or an existing registry with nothing
promoted yet: the embedded synthetic default model (a registry path that does not exist or is not a
registry is a load error, /readyz 503).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class KeyFileError(ValueError):
    """The configured API keys cannot be used: the service refuses to start rather than serve without auth."""


MIN_REGISTRY_POLL_S = 1.0  # the shortest registry watch interval (0 turns the watch off)


class Settings(BaseSettings):
    """Everything the service reads from its environment. Limits bound the work one request may ask for."""

    model_config = SettingsConfigDict(env_prefix="FLOWNP_", extra="ignore")

    # ---- models -------------------------------------------------------------------------------
    checkpoint: Path | None = Field(None, description="A checkpoint to serve (flownp pretrain/finetune).")
    checkpoint_sha256: str | None = Field(None, description="Its sha256 (else read from <checkpoint>.sha256).")
    checkpoint_version: str | None = Field(None, description="Version name for it (default: file stem).")
    registry: Path | None = Field(None, description="A model registry (flownp registry) to serve from.")
    registry_all: bool = Field(False, description="Serve every registry version, not only the current one.")
    default_version: str | None = Field(None, description="Version used when a request names none.")
    registry_poll_s: float = Field(0.0, description="Watch the registry: every this many seconds (0: off, else "
                                   f">= {MIN_REGISTRY_POLL_S:g}) read its CURRENT and reload when it changed "
                                   "(POST /v1/admin/reload reaches one process only, so set it with several "
                                   "replicas).")

    # ---- security ------------------------------------------------------------------------------
    api_keys: list[SecretStr] = Field(default_factory=list, description="API keys; empty with no file: auth off.")
    api_keys_file: Path | None = Field(None, description="One key per line, or 'sha256:<hex>' of a key.")

    # ---- HTTP server (flownp-serve: service.server) -----------------------------------------------
    header_timeout_s: float = Field(10.0, gt=0, description="A connection whose request headers are not all "
                                    "in this long after it opened (or after its previous answer) is closed.")
    body_timeout_s: float = Field(30.0, gt=0, description="A request body not all in this long after its "
                                  "headers: the connection is closed.")
    keep_alive_s: int = Field(5, ge=1, description="Idle keep-alive connections are closed after this long.")
    limit_concurrency: int | None = Field(64, ge=1, description="HTTP requests in flight at once; beyond, 503 "
                                          "overloaded (the /livez and /readyz probes are never refused; none: "
                                          "unbounded).")

    # ---- limits --------------------------------------------------------------------------------
    max_body_bytes: int = 4 * 1024 * 1024
    min_context: int = 1             # raised per model to the fewest context points it was trained on
    max_context: int = 2000
    max_targets: int = 2000
    max_samples: int = 64
    max_steps: int = 64
    max_probes: int = 16
    max_exact_full_targets: int = 32  # exact trace of a joint model: one VJP per target value per step
    max_quantiles: int = 9
    request_timeout_s: float = 60.0  # deadline per request (queue + work), 504 past it
    workers: int = 1                 # model threads (torch uses its own intra-op threads inside each)
    max_queue: int = 8               # requests waiting for a worker; beyond: 503 with Retry-After
    # cost of a job (service.admission.request_cost: targets x samples x solver evaluations, the context
    # weight, the log-likelihood's probes, the GP base); one unit ~ 10 us of one core of the dev machine
    max_request_cost: int = 2_000_000  # one request (~20 s of one core); beyond: 422 too_costly
    max_queued_cost: int = 6_000_000   # admitted work (running + queued); beyond: 503 unless a worker is free
    retry_after_s: int = 1           # Retry-After of an overload refusal
    ticket_grace_s: float = 2.0      # a retry ticket keeps its place Retry-After + this long after a refusal
    torch_threads: int | None = None
    warmup: bool = True

    # ---- logs ----------------------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field("text", description="flownp-serve's log lines: text, or one "
                                                "JSON object a line (--log-format overrides).")

    @field_validator("registry_poll_s")
    @classmethod
    def _poll_interval(cls, v: float) -> float:
        """0 (off) or at least MIN_REGISTRY_POLL_S: a tiny interval would busy-poll the registry's volume."""
        if v != 0 and not (MIN_REGISTRY_POLL_S <= v < math.inf):  # also refuses NaN, inf and negatives
            raise ValueError(f"FLOWNP_REGISTRY_POLL_S must be 0 (no registry watch) or at least "
                             f"{MIN_REGISTRY_POLL_S:g} seconds, got {v!r}")
        return v

    def key_hashes(self) -> list[bytes]:
        """sha256 digests of the configured keys (plain keys are hashed here, never kept or compared).

        Fails closed (KeyFileError): a key file that is set but unreadable or holds no key, a `sha256:`
        line that is not 64 hex digits, or an empty key; an empty list means auth is off."""
        out = []
        for k in self.api_keys:
            if not k.get_secret_value():
                raise KeyFileError("FLOWNP_API_KEYS holds an empty key")
            out.append(hashlib.sha256(k.get_secret_value().encode()).digest())
        if self.api_keys_file is None:
            return out
        try:
            text = self.api_keys_file.read_text()
        except OSError as exc:
            raise KeyFileError(f"FLOWNP_API_KEYS_FILE cannot be read ({exc.strerror or exc})") from None
        n = 0
        for i, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                hexd = line[7:].strip()
                if not _SHA256_HEX.fullmatch(hexd):
                    raise KeyFileError(f"FLOWNP_API_KEYS_FILE line {i}: 'sha256:' must be followed by the "
                                       "64 hex digits of a key's sha256")
                out.append(bytes.fromhex(hexd))
            else:
                out.append(hashlib.sha256(line.encode()).digest())
            n += 1
        if n == 0:
            raise KeyFileError("FLOWNP_API_KEYS_FILE is set but holds no key (empty or only comments); "
                               "refusing to serve with authentication off: add a key, or unset the variable")
        return out
