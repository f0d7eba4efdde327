"""Shared fixtures: the real ERA5 samples in ../shared (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_ERA5 = Path(__file__).resolve().parents[2] / "shared" / "data" / "era5"
GEOCAT = SHARED_ERA5 / "geocat_era5_1995-07-14T12_conus.nc"
BERLIN = SHARED_ERA5 / "feedinlib_ERA5_example_data_berlin_2017.nc"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real ERA5 sample {path.name} not found: ../shared/data/era5 is absent beside the checkout")
    return path


@pytest.fixture(scope="session")
def geocat_file() -> Path:
    """Real CDS output over CONUS, one map (1995-07-14 12Z)."""
    return _need(GEOCAT)


@pytest.fixture(scope="session")
def berlin_file() -> Path:
    """Real hourly ERA5 2017 on 2x3 points around Berlin: does not cover the region."""
    return _need(BERLIN)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A small synthetic store: train 1986, valid 1988, test 1989, 2 days of each winter month."""
    from ingest.build import build_store
    from ingest.synthetic import synthesize

    root = tmp_path_factory.mktemp("tiny")
    files = synthesize(root / "raw", [1986, 1988, 1989], days=range(1, 3), seed=0, progress=False)
    build_store(files, root / "store", progress=False)
    return root / "store"
