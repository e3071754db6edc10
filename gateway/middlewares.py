"""The error middleware: every failure leaves the gateway as {"error": {"code", "message"}}."""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .errors import GatewayError
from .keys import METRICS

log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        request.app[METRICS].count_error(err)
        return error_response(err.status, err.code, err.message, err.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # A 405 must say what is allowed (RFC 9110 15.5.6), in the header as well as in the message.
        allow = {"Allow": exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else None
        return error_response(exc.status, _code_for(exc.status), _message_for(exc), allow)
    except Exception:
        # CancelledError is a BaseException and passes through untouched.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "the gateway failed; the error has been logged")


def _code_for(status: int) -> str:
    if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        return "payload_too_large"
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


def _message_for(exc: web.HTTPException) -> str:
    if exc.status == HTTPStatus.NOT_FOUND:
        return "no such endpoint"
    if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
        return f"method not allowed here; allowed: {', '.join(sorted(getattr(exc, 'allowed_methods', ())))}"
    return exc.text or exc.reason
