"""Model registry: a directory of immutable, verified model versions and a pointer to the served one.

Layout (ROOT):
    versions/v0001/model.pt        the checkpoint (self-describing, loads with weights_only=True)
    versions/v0001/manifest.json   version, created, sha256 of every file, metrics, data window, base
                                   model, code version, the promotion comparison
    CURRENT                        the promoted version's name (replaced atomically)

A version directory is assembled under a temporary name and renamed into place, so a reader (the service,
a notebook) never sees a half-written version, and CURRENT only ever names a complete one. Versions are
kept until deleted on purpose; the current one cannot be deleted.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from flownp import __version__
from ingest.io import atomic_path, sha256_file

VERSION_RE = re.compile(r"^v\d{4,}$")


def version_number(name: str) -> int:
    """'v0042' -> 42."""
    return int(name[1:])


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, corrupt file, deleting the current)."""


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # ---- reading ---------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Version names in numeric order (v9999 before v10000; names are zero-padded to 4 digits only)."""
        if not self.versions_dir.is_dir():
            return []
        return sorted((p.name for p in self.versions_dir.iterdir() if VERSION_RE.match(p.name) and p.is_dir()),
                      key=version_number)

    def current(self) -> str | None:
        """The promoted version (None before the first promotion). A CURRENT naming a missing version is an
        error, never taken for an empty registry."""
        f = self.root / "CURRENT"
        if not f.exists():
            return None
        name = f.read_text().strip()
        if name not in self.versions():
            raise RegistryError(f"{self.root}: CURRENT names {name!r}, which is not a version here")
        return name

    def exists(self) -> bool:
        """Whether ROOT holds a registry (a versions/ directory or a CURRENT file)."""
        return self.versions_dir.is_dir() or (self.root / "CURRENT").is_file()

    def model_sha256(self, version: str) -> str:
        """The sha256 the manifest records for `version`'s model.pt."""
        return self.manifest(version)["files"]["model.pt"]

    def load(self, version: str | None = None) -> tuple[dict[str, Any], str, str]:
        """(checkpoint, sha256, version) of `version` (default: the current one): one read, checked
        against the manifest's sha256, loaded with weights_only=True (`flownp.checkpoint.load_verified`)."""
        from flownp.checkpoint import load_verified

        version = version or self.current()
        if version is None:
            raise RegistryError(f"{self.root}: no current model (nothing promoted yet)")
        ck, digest = load_verified(self._dir(version) / "model.pt", self.model_sha256(version),
                                   f"registry version {version}")
        return ck, digest, version

    def manifest(self, version: str) -> dict[str, Any]:
        path = self._dir(version) / "manifest.json"
        return json.loads(path.read_text())

    def model_path(self, version: str | None = None, *, verify: bool = True) -> Path:
        """The checkpoint of `version` (default: the current one), its sha256 checked against the manifest."""
        version = version or self.current()
        if version is None:
            raise RegistryError(f"{self.root}: no current model (nothing promoted yet)")
        path = self._dir(version) / "model.pt"
        if verify:
            want = self.model_sha256(version)
            if sha256_file(path) != want:
                raise RegistryError(f"version {version}: model.pt does not match its manifest's sha256")
        return path

    def list(self) -> list[dict[str, Any]]:
        cur = self.current()
        return [{**self.manifest(v), "current": v == cur} for v in self.versions()]

    def _dir(self, version: str) -> Path:
        if not VERSION_RE.match(version or "") or not (self.versions_dir / version).is_dir():
            raise RegistryError(f"unknown model version {version!r}; have {self.versions()}")
        return self.versions_dir / version

    # ---- writing ---------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the registry (concurrent jobs queue here, never interleave)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def add(self, checkpoint: str | Path, *, metrics: dict[str, Any], data: dict[str, Any] | None = None,
            base: dict[str, Any] | None = None, comparison: dict[str, Any] | None = None,
            promote: bool = False, expect_current: str | None | object = ...) -> str:
        """Copy `checkpoint` in as the next version with its manifest; optionally make it current
        (`expect_current`: only if the current version is still this one, see `promote`)."""
        with self._locked():
            version = self._add(checkpoint, metrics, data, base, comparison)
            if promote:
                self._promote(version, expect_current)
        return version

    def _add(self, checkpoint: str | Path, metrics: dict[str, Any], data: dict[str, Any] | None,
             base: dict[str, Any] | None, comparison: dict[str, Any] | None) -> str:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        existing = self.versions()
        version = f"v{max(map(version_number, existing), default=0) + 1:04d}"
        tmp = self.versions_dir / f".{version}.{os.getpid()}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            shutil.copyfile(checkpoint, tmp / "model.pt")
            manifest = {
                "version": version, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "files": {"model.pt": sha256_file(tmp / "model.pt")}, "metrics": metrics, "data": data or {},
                "base": base or {}, "comparison": comparison or {}, "code_version": __version__,
                "source_checkpoint": str(checkpoint),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for name in ("model.pt", "manifest.json"):  # on disk before the rename makes them visible
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, self.versions_dir / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    def promote(self, version: str, expect_current: str | None | object = ...) -> None:
        """Make `version` current. With `expect_current`, only if the current version is still that one
        (a job compared its candidate against it; if another job promoted meanwhile, refuse)."""
        with self._locked():
            self._promote(version, expect_current)

    def _promote(self, version: str, expect_current: str | None | object) -> None:
        self.model_path(version)  # exists and verifies
        if expect_current is not ... and self.current() != expect_current:
            raise RegistryError(f"the current version changed to {self.current()!r} since {expect_current!r} was "
                                f"compared against; rerun the job to compare with it")
        with atomic_path(self.root / "CURRENT") as tmp:
            tmp.write_text(version + "\n")

    def delete(self, version: str) -> None:
        with self._locked():
            if version == self.current():
                raise RegistryError(f"version {version} is current; promote another before deleting it")
            shutil.rmtree(self._dir(version))
