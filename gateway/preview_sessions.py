"""Preview login tickets, preview-session cookies and share cookies: JWTs the gateways sign, with a
key they keep in PostgreSQL, and verify (preview_auth.py says what they are for)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import jwt

from .tokens import USER_PATTERN, VerifiedMemo

TICKET_AUDIENCE = "sandbox-gateway:preview-login"
SESSION_AUDIENCE = "sandbox-gateway:preview-session"
SHARE_AUDIENCE = "sandbox-gateway:preview-share"
TICKET_LIFETIME_S = 60
SESSION_LIFETIME_S = 12 * 3600
ALGORITHM = "HS256"


def sign(user: str, audience: str, lifetime_s: int, key: bytes, host: str | None = None) -> str:
    """`host`: the one preview origin (its label) the token is good for; None for the path route.
    Each token has an id of its own (`jti`): login tickets are used once by it."""
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": user,
        "aud": audience,
        "iat": now,
        "exp": now + lifetime_s,
        "jti": secrets.token_hex(12),
    }
    if host is not None:
        claims["host"] = host
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def sign_share(share_id: str, label: str, expires: float, key: bytes) -> str:
    """A share cookie: which share, for which preview origin, until the share's own end at most."""
    now = int(time.time())
    lifetime = min(int(expires) - now, SESSION_LIFETIME_S)
    claims = {"sub": share_id, "aud": SHARE_AUDIENCE, "host": label, "iat": now, "exp": now + lifetime}
    return jwt.encode(claims, key, algorithm=ALGORITHM)


@dataclass(frozen=True, slots=True)
class Verified:
    subject: str  # a user, or for a share cookie the share's id
    host: str | None  # the label of the preview origin it is bound to; None: the path route
    expires: float
    id: str | None = None  # jti


def verified_claims(token: str, audience: str, key: bytes) -> Verified | None:
    """The subject, origin and expiry of a token we signed for `audience`; None for anything else."""
    try:
        claims = jwt.decode(
            token, key, algorithms=[ALGORITHM], audience=audience, options={"require": ["exp", "sub", "aud"]}
        )
    except jwt.InvalidTokenError:
        return None
    subject, host = claims["sub"], claims.get("host")
    if not isinstance(subject, str) or not USER_PATTERN.fullmatch(subject):
        return None
    if host is not None and not isinstance(host, str):
        return None
    token_id = claims.get("jti")
    return Verified(subject, host, float(claims["exp"]), token_id if isinstance(token_id, str) else None)


class PreviewSessions:
    """Verifies preview-session and share cookies, remembering those that passed: a browser sends its
    cookie with every module the dev server serves, and a signature check costs more than proxying one."""

    def __init__(self, key: bytes, size: int = 4096) -> None:
        self.key = key
        self._sessions: VerifiedMemo[Verified] = VerifiedMemo(size)
        self._shares: VerifiedMemo[Verified] = VerifiedMemo(size)

    def session(self, cookie: str) -> Verified | None:
        """A session cookie's user (`subject`) and the origin it was given for."""
        return self._verified(cookie, SESSION_AUDIENCE, self._sessions)

    def share(self, cookie: str) -> Verified | None:
        """A share cookie's share id (`subject`) and the origin it was given for."""
        return self._verified(cookie, SHARE_AUDIENCE, self._shares)

    def _verified(self, cookie: str, audience: str, memo: VerifiedMemo[Verified]) -> Verified | None:
        hit = memo.get(cookie)
        if hit is not None:
            return hit
        verified = verified_claims(cookie, audience, self.key)
        if verified is None:
            return None
        memo.put(cookie, verified, verified.expires)
        return verified
