"""The sandbox container as users get it: the operator's CA bundle is trusted by every tool."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shlex
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .helpers import MakeClient, auth

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

# Runs inside the sandbox: an HTTPS server on localhost with a certificate from the test's own CA,
# then each tool fetches from it. The server answers 404 to everything: a tool that reports the 404
# got through TLS; one that reports a certificate error did not.
PROBE = r"""
set -u
cd "$(mktemp -d)"
printf '%s' "$SERVER_CERT" > cert.pem
printf '%s' "$SERVER_KEY" > key.pem
python3 - <<'PY' &
import http.server, ssl
server = http.server.HTTPServer(("127.0.0.1", 8443), http.server.SimpleHTTPRequestHandler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("cert.pem", "key.pem")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
PY
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null && break; sleep 0.1; done
url=https://localhost:8443/x
verdict() {  # verdict TOOL PATTERN-THAT-MEANS-HTTP-ANSWERED
    # pip goes on to "Could not find a version" after a TLS failure: the failure is checked first.
    if grep -qiE "certificate|ssl|self.signed|unable to (get|verify)" out; then echo "$1 tls-failed"
    elif grep -qiE "$2" out; then echo "$1 answered"
    else echo "$1 unclear:$(tr -s ' \n' '__' <out | head -c 300)"; fi
}
curl -sS --max-time 20 -o /dev/null -w '%{http_code}' "$url" >out 2>&1; verdict curl '^404$'
git ls-remote "$url" >out 2>&1; verdict git "not found|404"
node -e "fetch('$url').then(r => console.log('status', r.status), e => console.log(e.cause ?? e))" >out 2>&1
verdict node "status 404"
npm view --fetch-retries=0 --registry https://localhost:8443/ some-package >out 2>&1
verdict npm "E404|404 Not Found"
python3 -c "import urllib.request; urllib.request.urlopen('$url')" >out 2>&1; verdict python "HTTP Error 404"
pip download --retries 0 --timeout 20 --no-deps --index-url https://localhost:8443/simple/ -d . pkg >out 2>&1
verdict pip "Could not find a version|404"
"""


def make_ca_and_server_cert() -> tuple[str, str, str]:
    """A throwaway CA, and a certificate for localhost that it signed: (ca, cert, key) as PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandbox-gateway test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem).decode(), cert.public_bytes(pem).decode(), key_pem.decode()


async def probe_tls(client: TestClient, cert: str, key: str) -> dict[str, str]:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    code = f"export SERVER_CERT={shlex.quote(cert)} SERVER_KEY={shlex.quote(key)}\n{PROBE}"
    response = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "bash", "code": code, "timeout_ms": 60_000},
    )
    result: dict[str, Any] = await response.json()
    assert result["timed_out"] is False, result
    return dict(line.split(" ", 1) for line in result["stdout"].splitlines())


async def test_every_tool_trusts_the_operators_ca(make_client: MakeClient, tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server_cert()
    bundle = tmp_path / "bundle.pem"
    host_bundle = await asyncio.to_thread(Path("/etc/ssl/certs/ca-certificates.crt").read_text)
    await asyncio.to_thread(bundle.write_text, host_bundle + ca)
    client = await make_client(ca_bundle=str(bundle))
    outcome = await probe_tls(client, cert, key)
    assert outcome == {tool: "answered" for tool in ("curl", "git", "node", "npm", "python", "pip")}


async def test_without_the_operators_ca_tls_fails(make_client: MakeClient) -> None:
    # The control: the same probe fails when the bundle lacks the test CA, so the test above can fail.
    _, cert, key = make_ca_and_server_cert()
    client = await make_client(ca_bundle="/etc/ssl/certs/ca-certificates.crt")
    outcome = await probe_tls(client, cert, key)
    assert outcome == {tool: "tls-failed" for tool in ("curl", "git", "node", "npm", "python", "pip")}
