"""`python -m gateway`: runs the gateway with settings from the environment."""

from __future__ import annotations

import logging
import os
import sys

from aiohttp import web

from .access_log import AccessLogger
from .app import create_app
from .settings import Settings, SettingsError


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        sys.exit(f"configuration error: {err}")
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log_class=AccessLogger,
        print=None,
    )


if __name__ == "__main__":
    main()
