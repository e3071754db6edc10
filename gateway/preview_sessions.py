"""Preview login tickets and preview-session cookies: JWTs the gateways sign, with a key they keep in
PostgreSQL, and verify (preview_auth.py says what they are for)."""

from __future__ import annotations

import time

import jwt

from .tokens import USER_PATTERN, VerifiedMemo

TICKET_AUDIENCE = "sandbox-gateway:preview-login"
SESSION_AUDIENCE = "sandbox-gateway:preview-session"
TICKET_LIFETIME_S = 60
SESSION_LIFETIME_S = 12 * 3600
ALGORITHM = "HS256"


def sign(user: str, audience: str, lifetime_s: int, key: bytes) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": user, "aud": audience, "iat": now, "exp": now + lifetime_s}, key, algorithm=ALGORITHM
    )


def verified_claims(token: str, audience: str, key: bytes) -> tuple[str, float] | None:
    """The user and expiry of a token we signed for `audience`; None for anything else."""
    try:
        claims = jwt.decode(
            token, key, algorithms=[ALGORITHM], audience=audience, options={"require": ["exp", "sub", "aud"]}
        )
    except jwt.InvalidTokenError:
        return None
    user = claims["sub"]
    if not isinstance(user, str) or not USER_PATTERN.fullmatch(user):
        return None
    return user, float(claims["exp"])


def verified_user(token: str, audience: str, key: bytes) -> str | None:
    verified = verified_claims(token, audience, key)
    return None if verified is None else verified[0]


class PreviewSessions:
    """Verifies preview-session cookies, remembering those that passed: a browser sends its cookie
    with every module the dev server serves, and a signature check costs more than proxying one."""

    def __init__(self, key: bytes, size: int = 4096) -> None:
        self.key = key
        self._verified: VerifiedMemo[str] = VerifiedMemo(size)

    def user(self, cookie: str) -> str | None:
        hit = self._verified.get(cookie)
        if hit is not None:
            return hit
        verified = verified_claims(cookie, SESSION_AUDIENCE, self.key)
        if verified is None:
            return None
        self._verified.put(cookie, *verified)
        return verified[0]
