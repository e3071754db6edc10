"""Each sandbox's own preview origin: `<label>.<preview domain>`, where the label is a random DNS label
made once per user and kept in PostgreSQL (as e2b gives each sandbox an id of its own).

Why a random label and not the user name: names may hold capitals, `.` and `_`, which a DNS label
folds together (`Alice`, `alice`) or cannot carry, and a name is easy to guess. Labels are 80 random
bits in lower-case base32, so two users never share one and nobody finds one by trying.
"""

from __future__ import annotations

import base64
import re
import secrets

import asyncpg

from . import db

LABEL_PREFIX = "p"
LABEL = re.compile(r"p[a-z2-7]{16}")
# Any port of a sandbox at its own origin beside the sandbox's: `<port>-<label>`, the port as written
# in decimal without leading zeros (one origin per port, never two spellings of one).
PORT_LABEL = re.compile(r"([1-9][0-9]{0,4})-(p[a-z2-7]{16})")


def new_label() -> str:
    # A letter first: some resolvers and certificates dislike labels that start with a digit, and the
    # any-port origins to come put "<port>-" before it.
    return LABEL_PREFIX + base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def label_of_host(host: str, suffix: str) -> str | None:
    """The label of a Host header that names one sandbox's preview origin, else None.

    Host names are case-insensitive, so the header is compared in lower case; anything else about it
    must be exact: one label, our domain and port. A trailing dot (`x.domain.:8080`) names the same
    host to DNS, but browsers keep its cookies apart, so it is refused rather than folded in."""
    lowered = host.lower()
    if not lowered.endswith(suffix):
        return None
    label = lowered[: -len(suffix)]
    return label if LABEL.fullmatch(label) else None


def origin_of_host(host: str, suffix: str) -> tuple[str, int | None] | None:
    """The sandbox label and port (None: the default route) of a Host header that names a preview
    origin, else None; as exact as label_of_host."""
    lowered = host.lower()
    if not lowered.endswith(suffix):
        return None
    first = lowered[: -len(suffix)]
    if LABEL.fullmatch(first):
        return first, None
    port_label = PORT_LABEL.fullmatch(first)
    if port_label is None or int(port_label[1]) > 65535:
        return None
    return port_label[2], int(port_label[1])


def port_host_label(label: str, port: int | None) -> str:
    """The first DNS label of a preview origin: the sandbox's label, or `<port>-<label>`."""
    return label if port is None else f"{port}-{label}"


class PreviewHosts:
    """Labels to users and back. A label never changes once made, so what was found is kept; a miss
    is asked again (an unknown label is a 404, however often it is tried)."""

    def __init__(self, pool: asyncpg.Pool, size: int = 100_000) -> None:
        self._pool = pool
        self._owners: dict[str, str] = {}
        self._labels: dict[str, str] = {}
        self._size = size

    def cached_owner(self, label: str) -> str | None:
        return self._owners.get(label)

    async def owner(self, label: str) -> str | None:
        owner = self._owners.get(label)
        if owner is not None:
            return owner
        async with db.connection(self._pool) as conn:
            owner = await db.label_owner(conn, label)
        if owner is not None:
            self._remember(label, owner)
        return owner

    async def label(self, user: str) -> str:
        """The user's label, made on first use."""
        label = self._labels.get(user)
        if label is not None:
            return label
        async with db.connection(self._pool) as conn:
            while True:
                try:
                    label = await db.preview_label(conn, user, new_label())
                    break
                except db.LabelTaken:
                    continue
        self._remember(label, user)
        return label

    def _remember(self, label: str, user: str) -> None:
        if len(self._owners) >= self._size:
            # Bounded: a deployment with more users than this asks the database a little more often.
            self._owners.clear()
            self._labels.clear()
        self._owners[label] = user
        self._labels[user] = label
