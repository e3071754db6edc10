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
        log_access(
            self.logger,
            remote=request.remote,
            method=request.method,
            path=request.path,
            status=response.status,
            seconds=time,
            request_id=request.get(REQUEST_ID, "-"),
        )


def log_access(
    logger: logging.Logger,
    *,
    remote: str | None,
    method: str,
    path: str,
    status: int,
    seconds: float,
    request_id: str,
) -> None:
    """One access line; aiohttp's requests and the front door's (frontdoor.py) both come here."""
    duration_ms = round(seconds * 1000, 1)
    logger.info(
        "%s %s %d %.1fms",
        method,
        path,
        status,
        duration_ms,
        extra={
            "remote": remote,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "request_id": request_id,
        },
    )
