"""The gateway container's health check: GET /healthz on the address the gateway listens on."""

import os
import sys
import urllib.error
import urllib.request

host = os.environ.get("GATEWAY_HOST", "").strip() or "127.0.0.1"
if host in ("0.0.0.0", "::"):  # noqa: S104 - every address includes the loopback one
    host = "127.0.0.1"
if ":" in host:
    host = f"[{host}]"
port = os.environ.get("GATEWAY_PORT", "").strip() or "8080"
try:
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (OSError, urllib.error.URLError) as err:
    sys.exit(f"unhealthy: {err}")
