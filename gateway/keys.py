"""Every typed key under which the application keeps a shared object."""

from __future__ import annotations

import aiodocker
import asyncpg
from aiohttp import web

from .activity import ActivityRecorder
from .egress import EgressGuard
from .execute import ExecRunner
from .metrics import Metrics
from .preview_access import PreviewGate
from .preview_hosts import PreviewHosts
from .preview_sessions import PreviewSessions
from .sandboxes import Sandboxes
from .settings import Settings
from .shares import ShareStore
from .tokens import TokenVerifier
from .upstream import UpstreamPool
from .user_slots import UserSlots
from .websockets import SocketRegistry

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", asyncpg.Pool)
# The engine's two clients (engine.py): calls that answer at once, and runs' and terminals' streams.
DOCKER = web.AppKey("docker", aiodocker.Docker)
DOCKER_STREAMS = web.AppKey("docker_streams", aiodocker.Docker)
SANDBOXES = web.AppKey("sandboxes", Sandboxes)
# Installs and checks the egress policy's kernel rules.
EGRESS = web.AppKey("egress", EgressGuard)
EXEC_RUNNER = web.AppKey("exec_runner", ExecRunner)
# Open process output streams per user (process_api.py).
PROCESS_STREAMS = web.AppKey("process_streams", UserSlots)
TERMINALS = web.AppKey("terminals", SocketRegistry)
# Uploads, downloads and archives streaming per user, and open watches (files_api.py, files_watch.py).
FILE_STREAMS = web.AppKey("file_streams", UserSlots)
FILE_WATCHES = web.AppKey("file_watches", SocketRegistry)
ACTIVITY = web.AppKey("activity", ActivityRecorder)
# Preview sessions, signed with a key from gateway_secrets.
PREVIEW_SESSIONS = web.AppKey("preview_sessions", PreviewSessions)
# Admission to previews (both transports ask it), each sandbox's preview label, and share links.
PREVIEW_GATE = web.AppKey("preview_gate", PreviewGate)
PREVIEW_HOSTS = web.AppKey("preview_hosts", PreviewHosts)
SHARES = web.AppKey("shares", ShareStore)
# The one upstream session of the preview proxy: pooled keep-alive connections to the sandboxes.
UPSTREAM = web.AppKey("upstream", UpstreamPool)
OPENAPI_DOCUMENT = web.AppKey("openapi_document", bytes)
# Routes reachable without a token; everything else is authenticated.
PUBLIC_ROUTES = web.AppKey("public_routes", frozenset)

TOKENS = web.AppKey("tokens", TokenVerifier)
METRICS = web.AppKey("metrics", Metrics)

# The authenticated user (the token's `sub`), set by the auth middleware.
USER = web.RequestKey("user", str)
# The id of the request in logs and in the X-Request-Id response header.
REQUEST_ID = web.RequestKey("request_id", str)
# The route label metrics count a request under, where the router's match is not it (preview origins).
ROUTE_LABEL = web.RequestKey("route_label", str)
# Whether the token carries the configured admin claim (settings.admin_claim).
IS_ADMIN = web.RequestKey("is_admin", bool)
