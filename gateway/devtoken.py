"""`python -m gateway.devtoken USER [HOURS]`: prints a token for USER signed with GATEWAY_JWT_SECRET.

A development convenience for `make run` and local scripts. In production, tokens come from your
identity provider, and the gateway only verifies them.
"""

from __future__ import annotations

import os
import sys

from .settings import SYMMETRIC_ALGORITHMS, Settings
from .tokens import USER_PATTERN, mint_token


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3) or not USER_PATTERN.fullmatch(argv[1]):
        sys.exit("usage: python -m gateway.devtoken USER [HOURS]  (USER like alice)")
    hours = float(argv[2]) if len(argv) == 3 else 12.0
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", "unused")
    settings = Settings.from_env(env)
    if settings.jwt_algorithm not in SYMMETRIC_ALGORITHMS:
        sys.exit("devtoken signs with GATEWAY_JWT_SECRET; with a public key, tokens come from your issuer")
    print(mint_token(argv[1], settings, lifetime_s=int(hours * 3600)))


if __name__ == "__main__":
    main(sys.argv)
