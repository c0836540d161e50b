"""Access tokens: Port's exchange, and a verifier that refuses every forged or stale token."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from jose import jwt

from tests.conftest import SECRET_KEY, OrgFactory


def _claims(org_id: uuid.UUID, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "portolan",
        "aud": "portolan-api",
        "sub": "someone",
        "iat": now,
        "exp": now + 600,
        "org": str(org_id),
        "kind": "app",
        "roles": ["Admin"],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _org_status(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/v1/organization", headers={"Authorization": f"Bearer {token}"})


async def test_access_token_has_ports_exact_shape(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    response = await client.post(
        "/v1/auth/access_token", json={"clientId": org.client_id, "clientSecret": org.client_secret}
    )
    body = response.json()
    assert response.status_code == 200
    assert set(body) == {"ok", "accessToken", "expiresIn", "tokenType"}
    assert body["ok"] is True and body["tokenType"] == "Bearer"
    assert isinstance(body["expiresIn"], int) and body["expiresIn"] > 0


async def test_token_from_exchange_reads_its_org(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    response = await _org_status(client, org.token)
    assert response.json()["organization"]["id"] == str(org.org_id)


async def test_wrong_secret_is_401(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    response = await client.post(
        "/v1/auth/access_token", json={"clientId": org.client_id, "clientSecret": "nope"}
    )
    assert response.status_code == 401
    assert response.json() == {
        "ok": False,
        "error": "invalid_credentials",
        "message": "Invalid client credentials",
    }


async def test_secret_of_another_org_is_401(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org_a = await make_org()
    org_b = await make_org()
    response = await client.post(
        "/v1/auth/access_token",
        json={"clientId": org_a.client_id, "clientSecret": org_b.client_secret},
    )
    assert response.status_code == 401


async def test_unknown_client_id_is_401(client: httpx.AsyncClient) -> None:
    for client_id in ("x", "0" * 32, "é" * 32):
        response = await client.post(
            "/v1/auth/access_token", json={"clientId": client_id, "clientSecret": "s"}
        )
        assert response.status_code == 401, client_id
        assert response.json()["ok"] is False


async def test_missing_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/organization")
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


async def test_non_bearer_scheme_is_401(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    response = await client.get("/v1/organization", headers={"Authorization": f"Basic {org.token}"})
    assert response.status_code == 401


async def test_expired_token_is_401(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    now = int(time.time())
    token = jwt.encode(_claims(org.org_id, iat=now - 100, exp=now - 10), SECRET_KEY, "HS256")
    response = await _org_status(client, token)
    assert response.status_code == 401
    assert response.json()["error"] == "token_expired"


async def test_tampered_token_is_401(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org_a = await make_org()
    org_b = await make_org()
    header, payload, signature = org_a.token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["org"] = str(org_b.org_id)
    forged = ".".join([header, _b64(json.dumps(claims).encode()), signature])
    response = await _org_status(client, forged)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


async def test_alg_none_token_is_401(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(org.org_id)).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        response = await _org_status(client, token)
        assert response.status_code == 401


async def test_wrong_audience_is_401(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    token = jwt.encode(_claims(org.org_id, aud="someone-else"), SECRET_KEY, "HS256")
    assert (await _org_status(client, token)).status_code == 401


async def test_wrong_issuer_is_401(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    token = jwt.encode(_claims(org.org_id, iss="evil"), SECRET_KEY, "HS256")
    assert (await _org_status(client, token)).status_code == 401


async def test_tokens_missing_a_required_claim_are_401(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for claim in ("exp", "iat", "aud", "iss", "sub", "org"):
        token = jwt.encode(_claims(org.org_id, **{claim: None}), SECRET_KEY, "HS256")
        response = await _org_status(client, token)
        assert response.status_code == 401, claim


async def test_token_of_an_unknown_kind_is_401(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    # Signed with our key, but neither a machine credential ("app", checked against its
    # credential) nor a person ("user", checked against the users table): such a token
    # would skip both checks, so it is no caller at all.
    org = await make_org()
    for kind in ("robot", "App", "USER", "", " app", None, 1, ["app"], {"kind": "app"}):
        token = jwt.encode(_claims(org.org_id, sub=org.client_id, kind=kind), SECRET_KEY, "HS256")
        for path in ("/v1/auth/me", "/v1/organization"):
            response = await client.get(path, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401, (kind, path, response.text)
            assert response.json() == {
                "ok": False,
                "error": "invalid_token",
                "message": "The access token is invalid",
            }, (kind, path)
    # The same token with a known kind is a caller (the refusal is the kind alone).
    token = jwt.encode(_claims(org.org_id, sub=org.client_id), SECRET_KEY, "HS256")
    response = await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.json()["me"]["kind"] == "app"


async def test_tokens_are_issued_only_for_known_kinds(app: FastAPI) -> None:
    with pytest.raises(ValueError, match="kind"):
        app.state.tokens.issue(org_id=uuid.uuid4(), subject="x", kind="robot", roles=[])


async def test_other_algorithm_with_the_right_key_is_401(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    # The algorithm is pinned: HS512 with our key is still refused.
    org = await make_org()
    token = jwt.encode(_claims(org.org_id), SECRET_KEY, "HS512")
    assert (await _org_status(client, token)).status_code == 401


async def test_algorithm_confusion_token_is_401(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    # An RS256 header over an HMAC made with a "public key" string must not be accepted.
    org = await make_org()
    header = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(org.org_id)).encode())
    import hashlib
    import hmac

    sig = hmac.new(SECRET_KEY.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{_b64(sig)}"
    assert (await _org_status(client, token)).status_code == 401


async def test_token_signed_with_another_key_is_401(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    token = jwt.encode(_claims(org.org_id), "another-key-" + "x" * 40, "HS256")
    assert (await _org_status(client, token)).status_code == 401


async def test_garbage_token_is_401(client: httpx.AsyncClient) -> None:
    for token in ("garbage", "a.b.c", "...."):
        response = await _org_status(client, token)
        assert response.status_code == 401
        assert response.json()["ok"] is False


async def test_client_secret_never_appears_in_logs(
    client: httpx.AsyncClient, make_org: OrgFactory, caplog: Any
) -> None:
    org = await make_org()
    caplog.set_level("DEBUG")
    await client.post(
        "/v1/auth/access_token", json={"clientId": org.client_id, "clientSecret": org.client_secret}
    )
    await client.post(
        "/v1/auth/access_token", json={"clientId": org.client_id, "clientSecret": "wrong-one"}
    )
    assert org.client_secret not in caplog.text
    assert "wrong-one" not in caplog.text
