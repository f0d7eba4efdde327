"""ERA5 ingest for flownp-weather: download, canonical layouts, the Memphis region, units and
normalisation, stores, the synthetic GP-weather generator and context/target tasks."""

__version__ = "0.1.0"
