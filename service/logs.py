"""Logging of `flownp-serve`: the service's own `flownp` loggers next to uvicorn's, as text or as one JSON
object a line (`--log-format json` / FLOWNP_LOG_FORMAT=json, for log collectors)."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
from typing import Any

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def log_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """A logging.config dict for uvicorn.run(log_config=...): uvicorn's own, plus the `flownp` logger at
    `level` (its INFO lines such as "models ready" and "models reloaded" are otherwise dropped)."""
    from uvicorn.config import LOGGING_CONFIG

    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["formatters"]["flownp"] = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(name)s: %(message)s"}
    if fmt == "json":
        cfg["formatters"] = {name: {"()": f"{__name__}.JsonFormatter"} for name in cfg["formatters"]}
    cfg["handlers"]["flownp"] = {"formatter": "flownp", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    cfg["loggers"]["flownp"] = {"handlers": ["flownp"], "level": level.upper(), "propagate": False}
    return cfg
