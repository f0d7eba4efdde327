"""The API's routers, one per resource: `ops` (probes, metrics), `models` (served models, reload),
`inference` (extrapolate, log-likelihood). `service.app.create_app` includes them."""

from service.routes import inference, models, ops

ROUTERS = (ops.router, models.router, inference.router)

__all__ = ["ROUTERS", "inference", "models", "ops"]
