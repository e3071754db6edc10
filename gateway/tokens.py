"""Tokens: verifying the users' JWTs (and remembering which passed), and minting development ones."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jwt

from .errors import Unauthorized
from .settings import Settings

# The user name appears in container names and URLs (/preview/<user>/), so it is kept to this.
USER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LEEWAY_S = 5
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token speaks for."""

    user: str
    is_admin: bool
    expires: float


def verify_token(token: str, settings: Settings) -> Identity:
    """The token's identity; Unauthorized for anything short of a valid, unexpired token."""
    try:
        claims = jwt.decode(
            token,
            settings.jwt_key,
            # Pinned: the token's own header never chooses the algorithm.
            algorithms=[settings.jwt_algorithm],
            options={"require": ["exp", "sub"]},
            leeway=LEEWAY_S,
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired") from None
    except jwt.InvalidTokenError:
        raise Unauthorized("the token is not valid") from None
    user = claims["sub"]
    if not isinstance(user, str) or not USER_PATTERN.fullmatch(user):
        raise Unauthorized("the token's subject is not a valid user name")
    _check_lifetime(claims, settings.max_token_lifetime_s)
    return Identity(user=user, is_admin=_is_admin(claims, settings), expires=float(claims["exp"]))


def _check_lifetime(claims: dict[str, Any], cap_s: int | None) -> None:
    """With a cap, a token must say when it was issued (`iat`), and live no longer than the cap: a
    token minted to expire in 2999 is refused however valid its signature."""
    if cap_s is None:
        return
    issued, expires = claims.get("iat"), claims["exp"]
    if not isinstance(issued, int | float) or isinstance(issued, bool):
        raise Unauthorized("the token must carry iat (issued at)")
    if not isinstance(expires, int | float) or expires - issued > cap_s:
        raise Unauthorized(f"the token lives longer than the {cap_s} s this gateway accepts")


def _is_admin(claims: dict[str, Any], settings: Settings) -> bool:
    """The admin claim holds the admin value, alone or in a list (identity providers do both:
    `"role": "admin"`, `"roles": ["admin", "dev"]`)."""
    value = claims.get(settings.admin_claim)
    if isinstance(value, list):
        return settings.admin_value in value
    return value == settings.admin_value


class VerifiedMemo(Generic[V]):
    """What verifying a token gave, keyed by the exact token, each entry good until the token's own
    expiry; the least recently used goes past `size`. A signature check costs more than the rest of a
    proxied preview request's own work, so the proxy asks this first."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[V, float]] = OrderedDict()

    def get(self, token: str) -> V | None:
        hit = self._entries.get(token)
        if hit is None or hit[1] <= time.time():
            return None
        self._entries.move_to_end(token)
        return hit[0]

    def put(self, token: str, value: V, expires: float) -> None:
        self._entries[token] = (value, expires)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


class TokenVerifier:
    """verify_token with a memory of the tokens that passed (a hit is the same bytes that passed
    before, and its expiry is checked on every hit)."""

    def __init__(self, settings: Settings, size: int = 4096) -> None:
        self._settings = settings
        self._verified: VerifiedMemo[Identity] = VerifiedMemo(size)

    def verify(self, token: str) -> Identity:
        hit = self._verified.get(token)
        if hit is not None:
            return hit
        identity = verify_token(token, self._settings)
        self._verified.put(token, identity, identity.expires)
        return identity


def parse_bearer(header: str) -> str:
    """The token of an `Authorization: Bearer <token>` header's value."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    raise Unauthorized("send Authorization: Bearer <token>")


def mint_token(user: str, settings: Settings, lifetime_s: int, *, admin: bool = False) -> str:
    """A token for `user`, for local development and tests only: production tokens come from the
    operator's identity provider."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + lifetime_s}
    if admin:
        claims[settings.admin_claim] = settings.admin_value
    return jwt.encode(claims, settings.jwt_key, algorithm=settings.jwt_algorithm)
