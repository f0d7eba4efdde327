"""ERA5 ingest for flownp-weather: download, canonical layouts, the Memphis region, units and
normalisation (`ingest.space.ModelSpace`: the one place that converts), stores, the synthetic GP-weather
generator and context/target tasks.

`__version__` is the distribution's (pyproject.toml), the one version string of all three packages.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("flownp-weather")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
