"""`flownp-serve`: run the service with uvicorn (settings from FLOWNP_* environment variables)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="flownp-serve", description="Serve FlowNP extrapolation over HTTP. "
                                "Models and limits come from FLOWNP_* variables (service/settings.py); with none "
                                "set it serves the embedded SYNTHETIC default model.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    import uvicorn

    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port,
                log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
