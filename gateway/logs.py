"""Logging: one JSON object per line (or plain text), each carrying the id of the request it belongs to.

The request id comes from the client or load balancer (`X-Request-Id`, when it is a sane token) or is
made here; it is returned in the response's `X-Request-Id` so a user's report leads to the log lines.
Log lines never carry a token, a cookie or submitted code: callers log names, ids and sizes only.
"""

from __future__ import annotations

import logging
import random
import re
from contextvars import ContextVar
from typing import TextIO

from aiohttp import web
from aiohttp.typedefs import Handler
from pythonjsonlogger.json import JsonFormatter

from .keys import REQUEST_ID

HEADER = "X-Request-Id"
# An id we accept from outside: short, and nothing that could forge a log field or a header.
INCOMING_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Which request the running task serves; aiohttp runs each request's handler in one task, and
# background tasks (the reaper) see the default.
current_request_id: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `log_format` ("json" or "text") lines, each with its request id."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{request_id}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
        )
    return handler


def configure_logging(level: str, log_format: str) -> None:
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format)], force=True)


def request_id_for(incoming: str | None) -> str:
    """The client's or load balancer's id if it is a sane one, else a new one."""
    if incoming and INCOMING_ID.fullmatch(incoming):
        return incoming
    # 128 random bits as hex, from the random module: an id needs to be unique, not secret, and this
    # is on every proxied request, where os.urandom's system call costs more than the rest of it.
    return f"{random.getrandbits(128):032x}"


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_for(request.headers.get(HEADER))
    request[REQUEST_ID] = request_id
    current_request_id.set(request_id)
    return await handler(request)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones and WebSocket upgrades included."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[HEADER] = request_id
