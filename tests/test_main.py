"""`python -m gateway`'s start-up: what it sets up for itself before serving."""

from __future__ import annotations

import subprocess
import sys

RAISE_FROM_1024 = """
import resource
from gateway.__main__ import raise_open_file_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
before, after = raise_open_file_limit()
print(before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
"""


def test_the_open_file_limit_is_raised_to_what_the_system_allows() -> None:
    """As a service starts (a soft limit of 1,024): raised to the hard limit, and said so."""
    result = subprocess.run(
        [sys.executable, "-c", RAISE_FROM_1024], capture_output=True, text=True, check=True
    )
    before, after, now, hard = (int(word) for word in result.stdout.split())
    assert before == min(1024, hard)
    assert after == now
    assert now == (hard if hard > 0 else 1 << 20)
    assert now >= before
