"""The extrapolation service (FastAPI): `service.app.create_app`, run by `flownp-serve`.

Modules: settings (FLOWNP_* environment), schemas (requests), deps (route dependencies), routes/ (one
router per resource: ops, models, inference), engine (model loading from the configured sources, worker
pool, jobs with a deadline and cancellation, registry watch), admission (by count and cost, retry
tickets), responses (JSON / CF netCDF), http (body, auth, metrics middleware), errors, metrics, logs
(flownp-serve's logging), client (httpx -> xarray). Conversions and inference are the library's
(`ingest.space`, `flownp.inference`); the service never imports training code.
"""

from ingest import __version__

__all__ = ["__version__"]
