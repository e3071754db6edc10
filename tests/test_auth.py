"""Token verification: pure unit tests, plus the middleware through the real application."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.errors import Unauthorized
from gateway.preview_sessions import SESSION_AUDIENCE, TICKET_AUDIENCE, PreviewSessions, sign
from gateway.settings import Settings, SettingsError
from gateway.tokens import TokenVerifier, VerifiedMemo, verify_token

from .helpers import JWT_SECRET, auth

SETTINGS = Settings(jwt_key=JWT_SECRET, database_url="unused")


def token(claims: dict[str, object], key: str = JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def valid_claims(**changes: object) -> dict[str, object]:
    return {"sub": "alice", "exp": int(time.time()) + 60, **changes}


def test_valid_token_names_its_user() -> None:
    identity = verify_token(token(valid_claims()), SETTINGS)
    assert identity.user == "alice"
    assert not identity.is_admin


@pytest.mark.parametrize(
    ("claims", "is_admin"),
    [
        ({"role": "admin"}, True),
        ({"role": ["dev", "admin"]}, True),
        ({"role": "administrator"}, False),
        ({"role": ["dev"]}, False),
        ({"role": {"admin": True}}, False),
        ({"roles": "admin"}, False),
    ],
)
def test_admin_is_the_configured_claim_holding_the_configured_value(
    claims: dict[str, object], is_admin: bool
) -> None:
    assert verify_token(token(valid_claims(**claims)), SETTINGS).is_admin is is_admin
    custom = Settings(jwt_key=SETTINGS.jwt_key, database_url="x", admin_claim="groups", admin_value="ops")
    assert verify_token(token(valid_claims(groups=["ops"])), custom).is_admin
    assert not verify_token(token(valid_claims(**claims)), custom).is_admin


@pytest.mark.parametrize(
    ("bad_token", "reason"),
    [
        (token(valid_claims(exp=int(time.time()) - 60)), "expired"),
        (token({"sub": "alice"}), "no exp"),
        (token({"exp": int(time.time()) + 60}), "no sub"),
        (token(valid_claims(), key="another-secret-that-is-long-enough-32"), "forged"),
        (token(valid_claims(), algorithm="HS512"), "algorithm not pinned"),
        (jwt.encode(valid_claims(), None, algorithm="none"), "alg none"),
        (token(valid_claims(sub="../bob")), "sub with a path"),
        (token(valid_claims(sub="a" * 65)), "sub too long"),
        (token(valid_claims(sub="")), "empty sub"),
        (token(valid_claims(sub=42)), "sub not a string"),
        ("not.a.token", "garbage"),
        ("", "empty"),
    ],
)
def test_bad_tokens_are_unauthorized(bad_token: str, reason: str) -> None:
    with pytest.raises(Unauthorized):
        verify_token(bad_token, SETTINGS)


def test_public_key_algorithms(tmp_path: Path) -> None:
    for private_key, algorithm in [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ]:
        public_pem = (
            private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        key_file = tmp_path / f"{algorithm}.pem"
        key_file.write_text(public_pem)
        settings = Settings.from_env(
            {
                "GATEWAY_JWT_PUBLIC_KEY_FILE": str(key_file),
                "GATEWAY_JWT_ALGORITHM": algorithm,
                "DATABASE_URL": "x",
            }
        )
        signed = token(valid_claims(), key=private_key, algorithm=algorithm)  # type: ignore[arg-type]
        assert verify_token(signed, settings).user == "alice"
        # The public key must never work as an HMAC secret (the classic algorithm confusion).
        with pytest.raises(SettingsError):
            Settings(jwt_key=public_pem, jwt_algorithm="HS256", database_url="x")


@pytest.mark.docker
@pytest.mark.postgres
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic YWxpY2U6cHc="},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": f"Bearer {token(valid_claims(exp=1))}"},
    ],
)
async def test_api_refuses_missing_or_bad_tokens(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/api/sandbox"), ("POST", "/api/sandbox"), ("DELETE", "/api/sandbox"),
                         ("POST", "/api/sandbox/exec")]:  # fmt: skip
        response = await client.request(method, path, headers=headers)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"


@pytest.mark.docker
@pytest.mark.postgres
async def test_expired_token_says_so(client: TestClient) -> None:
    response = await client.get("/api/sandbox", headers=auth("alice", lifetime_s=-60))
    assert response.status == 401
    assert "expired" in (await response.json())["error"]["message"]


def test_verifier_remembers_only_what_passed() -> None:
    verifier = TokenVerifier(SETTINGS, size=2)
    good = token(valid_claims())
    assert verifier.verify(good).user == "alice"
    assert verifier.verify(good).user == "alice"
    # Same claims, another key: a different token, checked in full and refused.
    with pytest.raises(Unauthorized):
        verifier.verify(token(valid_claims(), key="another-secret-that-is-long-enough-32"))
    # Past its size the oldest is forgotten, and verified again when it comes back.
    for user in ("bob", "carol", "dave"):
        assert verifier.verify(token(valid_claims(sub=user))).user == user
    assert verifier.verify(good).user == "alice"


def test_memo_forgets_what_has_expired() -> None:
    memo: VerifiedMemo[str] = VerifiedMemo(size=8)
    memo.put("fresh", "alice", time.time() + 60)
    memo.put("stale", "bob", time.time() - 1)
    assert memo.get("fresh") == "alice"
    assert memo.get("stale") is None
    assert memo.get("unknown") is None


def test_preview_sessions_remember_only_cookies_that_passed() -> None:
    key = b"preview-key-for-the-tests-32-bytes!"
    sessions = PreviewSessions(key, size=2)
    cookie = sign("alice", SESSION_AUDIENCE, 60, key)
    verified = sessions.session(cookie)
    assert verified is not None
    assert (verified.subject, verified.host) == ("alice", None)
    assert sessions.session(cookie) == verified
    bound = sessions.session(sign("alice", SESSION_AUDIENCE, 60, key, host="pabc"))
    assert bound is not None
    assert bound.host == "pabc"
    # A ticket is not a session, another key's cookie is not ours, an expired one is over.
    assert sessions.session(sign("alice", TICKET_AUDIENCE, 60, key)) is None
    assert (
        sessions.session(sign("alice", SESSION_AUDIENCE, 60, b"another-key-that-is-long-enough-32b")) is None
    )
    assert sessions.session(sign("alice", SESSION_AUDIENCE, -60, key)) is None
    assert sessions.session("not.a.token") is None


def test_an_operator_can_cap_a_tokens_lifetime() -> None:
    capped = Settings(jwt_key=JWT_SECRET, database_url="unused", max_token_lifetime_s=3600)
    now = int(time.time())
    assert verify_token(token(valid_claims(iat=now, exp=now + 3600)), capped).user == "alice"
    for claims, why in (
        (valid_claims(iat=now, exp=now + 3601), "longer than the cap"),
        (valid_claims(iat=now, exp=32503680000), "minted to expire in 3000"),
        (valid_claims(), "no iat to measure it by"),
    ):
        with pytest.raises(Unauthorized):
            verify_token(token(claims), capped)
        assert verify_token(token(claims), SETTINGS).user == "alice", f"uncapped: {why} is fine"
