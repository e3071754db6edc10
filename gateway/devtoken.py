"""`python -m gateway.devtoken [--admin] USER [HOURS]`: prints a token for USER signed with
GATEWAY_JWT_SECRET; with --admin it also carries the admin claim.

A development convenience for `make run` and local scripts. In production, tokens come from your
identity provider, and the gateway only verifies them.
"""

from __future__ import annotations

import argparse
import os
import sys

from .settings import SYMMETRIC_ALGORITHMS, Settings
from .tokens import USER_PATTERN, mint_token


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.devtoken", description=__doc__.splitlines()[0])
    parser.add_argument("user", help="the token's sub, like alice")
    parser.add_argument("hours", nargs="?", type=float, default=12.0, help="lifetime (default 12)")
    parser.add_argument("--admin", action="store_true", help="add GATEWAY_ADMIN_CLAIM=GATEWAY_ADMIN_VALUE")
    args = parser.parse_args(argv[1:])
    if not USER_PATTERN.fullmatch(args.user):
        parser.error(f"not a valid user name: {args.user!r}")
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", "unused")
    settings = Settings.from_env(env)
    if settings.jwt_algorithm not in SYMMETRIC_ALGORITHMS:
        sys.exit("devtoken signs with GATEWAY_JWT_SECRET; with a public key, tokens come from your issuer")
    print(mint_token(args.user, settings, lifetime_s=int(args.hours * 3600), admin=args.admin))


if __name__ == "__main__":
    main(sys.argv)
