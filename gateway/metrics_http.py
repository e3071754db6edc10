"""Serving the metrics: a middleware that counts every request, and /metrics itself.

/metrics answers on the main listener only to GATEWAY_METRICS_TOKEN, and on GATEWAY_METRICS_ADDRESS (a
second listener, for a private network) to anyone who reaches it.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from .auth import bearer_token
from .errors import Unauthorized
from .keys import DB, METRICS, ROUTE_LABEL, SETTINGS

log = logging.getLogger(__name__)

UNMATCHED_ROUTE = "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every request by its route template, never by its raw path (unbounded, and user names).
    It sits inside the error middleware's reach from outside: every failure is a response here."""
    started = time.perf_counter()
    response = await handler(request)
    route = request.get(ROUTE_LABEL)
    if route is None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED_ROUTE
    request.app[METRICS].count_request(route, request.method, response.status, time.perf_counter() - started)
    return response


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics on the main listener: only with the metrics token, and absent without one."""
    token = request.app[SETTINGS].metrics_token
    if token is None:
        raise web.HTTPNotFound()
    if not hmac.compare_digest(bearer_token(request).encode(), token.encode()):
        raise Unauthorized("send Authorization: Bearer <GATEWAY_METRICS_TOKEN>")
    return _response(await request.app[METRICS].exposition(request.app[DB]))


async def metrics_listener_ctx(app: web.Application) -> AsyncIterator[None]:
    """GATEWAY_METRICS_ADDRESS: a second listener that serves /metrics alone, without a token."""
    address = app[SETTINGS].metrics_address
    if address is None:
        yield
        return

    async def exposition(_: web.Request) -> web.Response:
        return _response(await app[METRICS].exposition(app[DB]))

    listener = web.Application()
    listener.router.add_get("/metrics", exposition)
    runner = web.AppRunner(listener, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, address[0], address[1]).start()
        log.info("metrics on http://%s:%d/metrics", *address)
        yield
    finally:
        await runner.cleanup()


def _response(exposition: bytes) -> web.Response:
    response = web.Response(body=exposition)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
