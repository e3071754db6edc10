"""Tokens: verifying the users' JWTs (and remembering which passed), and minting development ones."""

from __future__ import annotations

import re
import time
from collections import OrderedDict

import jwt

from .errors import Unauthorized
from .settings import Settings

# The user name appears in container names and URLs (/preview/<user>/), so it is kept to this.
USER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LEEWAY_S = 5


def verify_token(token: str, settings: Settings) -> str:
    """The token's user (`sub`); Unauthorized for anything short of a valid, unexpired token."""
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
    return user


class TokenVerifier:
    """verify_token with a memory of tokens already verified: a signature check costs more than the
    rest of a proxied preview request's own work. Keyed by the exact token, so a hit is the same
    bytes that passed before; the expiry is checked on every hit."""

    def __init__(self, settings: Settings, size: int = 4096) -> None:
        self._settings = settings
        self._size = size
        self._verified: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def verify(self, token: str) -> str:
        hit = self._verified.get(token)
        if hit is not None and hit[1] > time.time():
            self._verified.move_to_end(token)
            return hit[0]
        user = verify_token(token, self._settings)
        expires = jwt.decode(token, options={"verify_signature": False})["exp"]
        self._verified[token] = (user, float(expires))
        if len(self._verified) > self._size:
            self._verified.popitem(last=False)
        return user


def mint_token(user: str, settings: Settings, lifetime_s: int) -> str:
    """A token for `user`, for local development and tests only: production tokens come from the
    operator's identity provider."""
    now = int(time.time())
    return jwt.encode(
        {"sub": user, "iat": now, "exp": now + lifetime_s}, settings.jwt_key, algorithm=settings.jwt_algorithm
    )
