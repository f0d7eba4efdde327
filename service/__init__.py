"""The extrapolation service (FastAPI): `service.app.create_app`, run by `flownp-serve`.

Modules: settings (FLOWNP_* environment), schemas (requests), convert (API units <-> model space through
ingest), engine (verified model loading, worker pool, limits), responses (JSON / CF netCDF), http (body,
auth, metrics middleware), metrics, default_model (the embedded synthetic model), client (httpx -> xarray).
"""

__version__ = "0.1.0"
