"""Admission to a preview, the one decision both transports ask for (the front door for the requests
it proxies itself, aiohttp for everything else): which sandbox a request is for, whether the viewer
may see it, where its dev server listens, and whether the visit counts as activity.

Two routes lead to a preview:
- **its own origin**, `<label>.<preview domain>`, where the dev server is served at the root, so any
  app with root-absolute URLs works unmodified; and beside it `<port>-<label>.<preview domain>` for
  any other port P of the sandbox, reached through the sandbox's agent (servers listening on the
  sandbox's loopback only included), with the same credentials, sharing and isolation, each origin
  with cookies of its own;
- **the path route**, `/preview/<user>/` on the shared preview origin, for projects that set their
  base to it (kept so that nothing that worked before breaks).

The checks run in one order whoever asks: route (host and path), credential, origin, then the
sandbox's port and activity. `admit_now` answers without waiting when every fact is in memory (the
label's owner, the share's state and the port, each cached briefly), else says so and the caller
awaits `admit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiohttp import hdrs, web

from .activity import ActivityRecorder
from .db import Share
from .errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    PreviewNotFound,
    SandboxNotRunning,
    SandboxPaused,
    Unauthorized,
)
from .preview_headers import SESSION_COOKIE, SHARE_COOKIE, UPSTREAM_HOST, cookie_values, sound_path
from .preview_hosts import PreviewHosts, origin_of_host, port_host_label
from .preview_sessions import PreviewSessions
from .sandboxes import PreviewTarget, Sandboxes
from .settings import Settings
from .shares import ShareStore, is_live
from .tokens import USER_PATTERN, TokenVerifier, parse_bearer
from .upstream import DevServer, Relayed, Target

PATH_ROUTE_PREFIX = "/preview/"
# The metrics' route labels of the two routes (never a raw path, a user or a label).
PATH_ROUTE_LABEL = "/preview/{user}/{tail}"  # what aiohttp's router names the path route
ROOT_ROUTE_LABEL = "{preview_origin}/{tail}"
# Paths of a sandbox's own origin that the gateway answers itself (login, share links, waking up);
# everything else is the dev server's.
RESERVED_PREFIX = "/_sandbox-gateway/"
# The dev server's port of the default route, and the agent's own, which no origin reaches.
DEV_SERVER_PORT = 5173
AGENT_PORT = 49983


class PreviewRedirect(GatewayError):
    """A browser asked for a path preview on the page's origin: it belongs on the preview origin."""

    status = 307
    code = "preview_redirect"

    def __init__(self, location: str) -> None:
        super().__init__("previews are served on the preview origin")
        self.location = location


@dataclass(frozen=True, slots=True)
class PreviewRequest:
    """What admission reads of a request, from either transport. Headers are as sent (the first of
    a repeated one, which the front door never takes), None when absent."""

    host: str
    path: str  # the raw path, without the query
    authorization: str | None
    cookie: str | None
    origin: str | None
    upgrade: bool

    @classmethod
    def of(cls, request: web.Request) -> PreviewRequest:
        """As aiohttp parsed it."""
        headers = request.headers
        return cls(
            host=request.host,
            path=request.rel_url.raw_path,
            authorization=headers.get(hdrs.AUTHORIZATION),
            cookie=headers.get(hdrs.COOKIE),
            origin=headers.get(hdrs.ORIGIN),
            upgrade=headers.get(hdrs.UPGRADE, "").lower() == "websocket",
        )


@dataclass(frozen=True, slots=True)
class Route:
    label: str | None  # the sandbox's own origin; None: the path route
    user: str | None  # None only while a label's owner is not known yet
    prefix: str  # where the preview lives on its origin: "/" or "/preview/<user>/"
    origin: str  # this preview's origin, as browsers name it
    port: int | None = None  # a `<port>-<label>` origin's port; None: the default route (5173)

    @property
    def host_label(self) -> str | None:
        """What this origin's cookies and login tickets are bound to: its first DNS label."""
        return None if self.label is None else port_host_label(self.label, self.port)


@dataclass(frozen=True, slots=True)
class Viewer:
    kind: Literal["owner", "share"]
    share: Share | None = None

    @property
    def counts_as_activity(self) -> bool:
        # Anonymous viewers of a share link do not keep the owner's sandbox alive (README, Sharing).
        return self.kind == "owner"

    @property
    def may_wake(self) -> bool:
        return self.kind == "owner" or (self.share is not None and self.share.can_wake)


@dataclass(frozen=True, slots=True)
class Admitted:
    user: str
    target: Target  # where the upstream connection goes (upstream.py)
    prefix: str
    viewer: Viewer
    sandbox_port: int = DEV_SERVER_PORT  # the port inside the sandbox

    @property
    def upstream_host(self) -> str:
        """The Host the server in the sandbox sees: its own."""
        return UPSTREAM_HOST if self.sandbox_port == DEV_SERVER_PORT else f"localhost:{self.sandbox_port}"


OWNER = Viewer("owner")


class StoppedPreview(SandboxNotRunning):
    """The viewer may see the preview, but its sandbox is not running (a page may offer to wake it)."""

    def __init__(self, route: Route, viewer: Viewer) -> None:
        super().__init__("the sandbox of this preview is not running")
        self.route = route
        self.viewer = viewer


class Pending(Exception):
    """A fact admission needs is not in memory: the caller awaits `admit` instead."""


class PreviewGate:
    def __init__(
        self,
        settings: Settings,
        tokens: TokenVerifier,
        sessions: PreviewSessions,
        hosts: PreviewHosts,
        shares: ShareStore,
        sandboxes: Sandboxes,
        activity: ActivityRecorder,
    ) -> None:
        self.settings = settings
        self._tokens = tokens
        self._sessions = sessions
        self.hosts = hosts
        self.shares = shares
        self._sandboxes = sandboxes
        self.activity = activity

    async def urls(self, user: str) -> dict[str, str]:
        """Where the user's preview is: its own origin, and the path route."""
        label = await self.hosts.label(user)
        return {
            "preview_url": self.settings.preview_root_origin(label) + "/",
            "path_preview_url": f"{self.settings.preview_origin}{PATH_ROUTE_PREFIX}{user}/",
        }

    def port_url(self, label: str, port: int) -> str:
        """The origin of port `port` of the sandbox whose label is `label`, with its root path."""
        return self.settings.preview_root_origin(port_host_label(label, port)) + "/"

    # -- the route --
    def route(self, host: str, path: str, has_bearer: bool) -> Route | None:
        """Which preview a request is for; None when it is not for a preview at all (the page, the
        API, a login). Raises for a request that names a preview badly."""
        settings = self.settings
        if settings.on_preview_domain(host):
            if path.startswith(RESERVED_PREFIX):
                return None
            found = origin_of_host(host, settings.preview_root_suffix)
            if found is None:
                raise PreviewNotFound("no preview is served at this host")
            label, port = found
            if port == AGENT_PORT:
                raise PreviewNotFound(
                    f"port {AGENT_PORT} is the sandbox agent's own: no preview is served there"
                )
            if not sound_path(path, "/"):
                raise InvalidRequest("malformed preview path")
            origin = settings.preview_root_origin(port_host_label(label, port))
            return Route(label, self.hosts.cached_owner(label), "/", origin, port)
        if not path.startswith(PATH_ROUTE_PREFIX):
            return None
        user = path.split("/", 3)[2] if path.count("/") >= 3 else ""
        if not USER_PATTERN.fullmatch(user):
            raise PreviewNotFound("no such preview")
        prefix = f"{PATH_ROUTE_PREFIX}{user}/"
        # Matching happened on the raw path; a dev server decoding it must agree on whose it is.
        if not sound_path(path, prefix):
            raise InvalidRequest("malformed preview path")
        if host != settings.preview_host and not has_bearer:
            # A browser on the main origin: previews render only on a preview origin.
            raise PreviewRedirect(settings.preview_origin)
        return Route(None, user, prefix, settings.preview_origin)

    async def resolved(self, route: Route) -> Route:
        """The route with its owner known (a label's owner is looked up once)."""
        if route.user is not None:
            return route
        assert route.label is not None
        owner = await self.hosts.owner(route.label)
        if owner is None:
            raise PreviewNotFound("no preview is served at this host")
        return Route(route.label, owner, route.prefix, route.origin, route.port)

    # -- the viewer --
    def viewer_now(
        self, route: Route, request: PreviewRequest, looked_up: dict[str, Share | None] | None = None
    ) -> Viewer:
        """The owner (bearer token or session cookie) or a share link's viewer; Pending when a share
        must be re-read first (unless `looked_up` has it). Unauthorized or Forbidden for anyone else."""
        owner = route.user
        assert owner is not None
        if request.authorization is not None:
            # Scripts; a browser never sends the header on its own to a preview origin.
            if self._tokens.verify(parse_bearer(request.authorization)).user != owner:
                raise Forbidden("this preview belongs to another user")
            return OWNER
        cookies = request.cookie or ""
        someone_else = False
        # Every value of the cookie: a sibling origin may have tossed one of the same name at us.
        for value in cookie_values(cookies, SESSION_COOKIE):
            session = self._sessions.session(value)
            if session is None or session.host != route.host_label:
                continue
            if session.subject == owner:
                return self._same_origin(route, request, OWNER)
            someone_else = True
        # Share links open the default route only (preview_auth.open_share).
        if route.label is not None and route.port is None:
            for value in cookie_values(cookies, SHARE_COOKIE):
                claims = self._sessions.share(value)
                if claims is None or claims.host != route.host_label:
                    continue
                if looked_up is not None and claims.subject in looked_up:
                    share = looked_up[claims.subject]
                else:
                    cached = self.shares.cached(claims.subject)
                    if cached is None:
                        raise Pending
                    share = cached[0]
                if share is not None and share.user == owner and is_live(share):
                    return self._same_origin(route, request, Viewer("share", share))
        if someone_else:
            raise Forbidden("this preview belongs to another user")
        raise Unauthorized("sign in to see this preview: open it from the page, or send a bearer token")

    def _same_origin(self, route: Route, request: PreviewRequest, viewer: Viewer) -> Viewer:
        """A cookie opens a preview only for requests of that preview's own page: another origin's
        fetch or WebSocket would carry the cookie too (previews of one site are same-site), and read
        the answer wherever the dev server allows cross-origin reads."""
        if self._foreign(route, request.origin):
            raise Forbidden(f"requests from origin {request.origin} may not use this preview's cookie")
        return viewer

    def _foreign(self, route: Route, origin: str | None) -> bool:
        """Whether a browser's request comes from another origin than the preview's own (or an
        allowed one); no Origin at all is a navigation, or not a browser."""
        return origin is not None and origin != route.origin and origin not in self.settings.allowed_origins

    async def viewer(self, route: Route, request: PreviewRequest) -> Viewer:
        try:
            return self.viewer_now(route, request)
        except Pending:
            pass
        looked_up: dict[str, Share | None] = {}
        for value in cookie_values(request.cookie or "", SHARE_COOKIE):
            claims = self._sessions.share(value)
            if claims is not None and claims.host == route.host_label and claims.subject not in looked_up:
                looked_up[claims.subject] = await self.shares.get(claims.subject)
        return self.viewer_now(route, request, looked_up)

    def check_websocket_origin(self, route: Route, request: PreviewRequest) -> None:
        """A browser's WebSocket to a preview comes from that preview's own origin or an allowed one."""
        if request.upgrade and self._foreign(route, request.origin):
            raise Forbidden(f"WebSocket connections from origin {request.origin} are not allowed")

    def _check_not_paused(self, user: str) -> None:
        # A paused sandbox accepts connections and answers nothing: say so now, not at the timeout.
        if self._sandboxes.is_paused(user):
            raise SandboxPaused()

    # -- admission --
    def admit_now(self, route: Route, request: PreviewRequest) -> Admitted | None:
        """`admit` without waiting: None if anything must be looked up or written first; raises
        what `admit` would raise."""
        if route.user is None:
            return None
        try:
            viewer = self.viewer_now(route, request)
        except Pending:
            return None
        self.check_websocket_origin(route, request)
        self._check_not_paused(route.user)
        preview = self._sandboxes.cached_preview_target(route.user)
        if preview is None or (viewer.counts_as_activity and self.activity.due(route.user)):
            return None
        return self._admitted(route, route.user, preview, viewer)

    async def admit(self, route: Route, request: PreviewRequest) -> Admitted:
        route = await self.resolved(route)
        assert route.user is not None
        viewer = await self.viewer(route, request)
        self.check_websocket_origin(route, request)
        self._check_not_paused(route.user)
        try:
            preview = await self._sandboxes.preview_target(route.user)
        except SandboxNotRunning:
            raise StoppedPreview(route, viewer) from None
        if viewer.counts_as_activity:
            await self.activity.seen(route.user)
        return self._admitted(route, route.user, preview, viewer)

    def _admitted(self, route: Route, user: str, preview: PreviewTarget, viewer: Viewer) -> Admitted:
        """Where the request goes: the published 5173 (through the agent if that leads nowhere), or
        any other port through the agent."""
        relays = self.settings.preview_port_relays
        if route.port is None:
            if preview.agent is None:
                return Admitted(user, preview.host_port, route.prefix, viewer)
            fallback = Relayed(preview.agent, DEV_SERVER_PORT, relays)
            return Admitted(user, DevServer(preview.host_port, fallback), route.prefix, viewer)
        if preview.agent is None:
            raise SandboxNotRunning("your sandbox was started before this gateway's agent; restart it")
        return Admitted(user, Relayed(preview.agent, route.port, relays), route.prefix, viewer, route.port)
