"""Download links (README "Files"): a browser streams a download to disk only when it navigates to it,
and a navigation carries no Authorization header. So the page asks for a link: a JWT the gateways
sign (with the preview tickets' key, under an audience of its own), bound to one user, one path and
how it is sent (the file, or a folder as a zip or a tar), good for a minute and for one use (recorded
in the table of used preview tickets, which the reaper empties), so one that leaks through history or
a referrer opens nothing."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Literal, cast, get_args

import jwt

from .tokens import USER_PATTERN

AUDIENCE = "sandbox-gateway:file-download"
LIFETIME_S = 60
ALGORITHM = "HS256"
Form = Literal["file", "zip", "tar"]
FORMS: tuple[str, ...] = get_args(Form)


@dataclass(frozen=True, slots=True)
class Download:
    user: str
    path: str
    form: Form
    id: str
    expires: float


def sign(user: str, path: str, form: Form, key: bytes, lifetime_s: int = LIFETIME_S) -> tuple[str, float]:
    """The link's token, and when it expires (seconds since the epoch)."""
    now = int(time.time())
    expires = now + lifetime_s
    claims = {
        "sub": user,
        "aud": AUDIENCE,
        "iat": now,
        "exp": expires,
        "jti": secrets.token_hex(12),
        "path": path,
        "form": form,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM), float(expires)


def verified(token: str, key: bytes) -> Download | None:
    """What a link we signed allows; None for anything else (forged, expired, another audience)."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            options={"require": ["exp", "sub", "aud", "jti", "path", "form"]},
        )
    except jwt.InvalidTokenError:
        return None
    user, path, form, token_id = claims["sub"], claims["path"], claims["form"], claims["jti"]
    if not isinstance(user, str) or not USER_PATTERN.fullmatch(user):
        return None
    if not isinstance(path, str) or not isinstance(token_id, str) or form not in FORMS:
        return None
    return Download(user, path, cast(Form, form), token_id, float(claims["exp"]))
