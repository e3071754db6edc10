"""`python -m gateway`: runs the gateway with settings from the environment."""

from __future__ import annotations

import os
import sys

from aiohttp import web

from .access_log import AccessLogger
from .app import SERVER_OPTIONS, create_app
from .logs import configure_logging
from .settings import Settings, SettingsError


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        sys.exit(f"configuration error: {err}")
    configure_logging(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"), settings.log_format)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log_class=AccessLogger,
        print=None,
        **SERVER_OPTIONS,
    )


if __name__ == "__main__":
    main()
