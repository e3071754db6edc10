"""The access log: method, path without its query string, status, time, as fields of the log line.
Never headers or queries, where tokens travel."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .keys import REQUEST_ID


class AccessLogger(AbstractAccessLogger):
    @property
    def enabled(self) -> bool:
        # Spares building the line's fields on every request when INFO is off.
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        duration_ms = round(time * 1000, 1)
        self.logger.info(
            "%s %s %d %.1fms",
            request.method,
            request.path,
            response.status,
            duration_ms,
            extra={
                "remote": request.remote,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": duration_ms,
                "request_id": request.get(REQUEST_ID, "-"),
            },
        )
