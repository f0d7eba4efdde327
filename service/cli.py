"""`flownp-serve`: run the service with uvicorn (settings from FLOWNP_* environment variables)."""

from __future__ import annotations

import argparse
import subprocess

from service.logs import FORMATS, log_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="flownp-serve", description="Serve FlowNP extrapolation over HTTP. "
                                "Models and limits come from FLOWNP_* variables (service/settings.py); with none "
                                "set it serves the embedded SYNTHETIC default model.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=FORMATS, default=None,
                   help="text, or one JSON object a line (default: FLOWNP_LOG_FORMAT, else text)")
    args = p.parse_args(argv)
    import uvicorn
    from pydantic import ValidationError

    from service.server import uvicorn_options
    from service.settings import KeyFileError, Settings

    try:  # refuse to start, with one clear line, on settings the app could not honour (fails closed)
        settings = Settings()
        settings.key_hashes()
    except (KeyFileError, ValidationError) as exc:
        raise SystemExit(f"flownp-serve: {exc}") from None
    fmt = args.log_format or settings.log_format
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port,
                log_level=args.log_level, access_log=False, log_config=log_config(args.log_level, fmt),
                **uvicorn_options(settings))


def stop(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """Stop a server process started with `flownp-serve` (tests, benchmarks): SIGTERM, then SIGKILL if it
    has not exited within `wait_s`."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()


if __name__ == "__main__":
    main()
