"""Sign-in with OpenID Connect: per-org settings, one verifier for every bearer token, and
the users, roles and teams a sign-in provisions.

The identity provider is tests/idp.py: keys made here, its JWKS served on 127.0.0.1 (which
the app under test is allowed to call, as an operator would allow an in-cluster provider).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from app.auth.service import create_credential
from app.auth.verifier import NOT_SIGNED_IN
from app.config import Settings
from app.db.database import Database
from app.main import create_app
from tests.conftest import Org, OrgFactory
from tests.idp import IdentityProvider, ec_key, hmac_signed, rsa_key, unsigned

AUDIENCE = "portolan-sso"


@asynccontextmanager
async def _serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://portolan.test") as c:
            yield c


def _sso_settings(fresh_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    return fresh_settings(
        **{"outbound_allow": ["127.0.0.1/32"], "oidc_jwks_refetch_seconds": 0.2, **overrides}
    )


@pytest.fixture
async def sso(fresh_settings: Callable[..., Settings]) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app that may call the provider on 127.0.0.1."""
    async with _serve(_sso_settings(fresh_settings)) as client:
        yield client


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    provider.add(rsa_key("k1"))
    with provider:
        yield provider


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _email() -> str:
    return f"ada-{uuid.uuid4().hex[:8]}@example.com"


async def _configure(
    client: httpx.AsyncClient,
    org: Org,
    idp: IdentityProvider,
    audience: str = AUDIENCE,
    **extra: Any,
) -> httpx.Response:
    body = {"issuer": idp.issuer, "audience": audience, "jwksUri": idp.jwks_uri, **extra}
    return await client.put("/v1/organization/oidc", json=body, headers=org.headers)


async def _configured(
    client: httpx.AsyncClient, org: Org, idp: IdentityProvider, **extra: Any
) -> None:
    r = await _configure(client, org, idp, **extra)
    assert r.status_code == 200, r.text


async def _user(db: Database, org_id: uuid.UUID, email: str) -> asyncpg.Record | None:
    async with db.system() as tx:
        return await tx.fetchrow(
            "SELECT * FROM users WHERE org_id = $1 AND email = $2", org_id, email
        )


async def _memberships(db: Database, org_id: uuid.UUID, email: str) -> set[tuple[str, str]]:
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT t.name, m.source FROM team_members m "
            "JOIN teams t ON t.org_id = m.org_id AND t.id = m.team_id "
            "JOIN users u ON u.org_id = m.org_id AND u.id = m.user_id "
            "WHERE m.org_id = $1 AND u.email = $2",
            org_id,
            email,
        )
    return {(r["name"], r["source"]) for r in rows}


async def _member_headers(db: Database, client: httpx.AsyncClient, org: Org) -> dict[str, str]:
    async with db.tenant(org.org_id) as tx:
        made = await create_credential(tx, org_id=org.org_id, name="member", roles=["Member"])
    r = await client.post(
        "/v1/auth/access_token",
        json={"clientId": made.client_id, "clientSecret": made.client_secret},
    )
    assert r.status_code == 200, r.text
    return _bearer(r.json()["accessToken"])


# -- settings ------------------------------------------------------------------------------


async def test_admin_sets_reads_and_removes_the_settings(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    org = await make_org()
    assert (await sso.get("/v1/organization/oidc", headers=org.headers)).status_code == 404
    r = await _configure(sso, org, idp, groupsClaim="groups", groupTeams={"eng": "Engineering"})
    assert r.status_code == 200, r.text
    expected = {
        "issuer": idp.issuer,
        "audience": AUDIENCE,
        "jwksUri": idp.jwks_uri,
        "emailClaim": "email",
        "nameClaim": "name",
        "groupsClaim": "groups",
        "groupTeams": {"eng": "Engineering"},
        "groupRoles": {},
    }
    body = r.json()
    assert body["ok"] is True
    assert {k: v for k, v in body["oidc"].items() if k != "updatedAt"} == expected
    read = await sso.get("/v1/organization/oidc", headers=org.headers)
    assert read.json() == body
    removed = await sso.delete("/v1/organization/oidc", headers=org.headers)
    assert removed.status_code == 200 and removed.json() == {"ok": True}
    assert (await sso.get("/v1/organization/oidc", headers=org.headers)).status_code == 404
    assert (await sso.delete("/v1/organization/oidc", headers=org.headers)).status_code == 404


async def test_member_cannot_read_or_change_the_settings(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider
) -> None:
    org = await make_org()
    member = await _member_headers(db, sso, org)
    body = {"issuer": idp.issuer, "audience": AUDIENCE, "jwksUri": idp.jwks_uri}
    answers = [
        await sso.get("/v1/organization/oidc", headers=member),
        await sso.put("/v1/organization/oidc", json=body, headers=member),
        await sso.delete("/v1/organization/oidc", headers=member),
    ]
    assert [a.status_code for a in answers] == [403, 403, 403]
    assert answers[0].json()["error"] == "missing_permission"
    assert "oidc.read" in answers[0].json()["message"]
    assert "oidc.update" in answers[1].json()["message"]
    assert idp.jwks_requests == 0


async def test_jwks_uri_on_a_private_address_is_refused_without_an_allow_list(
    client: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    """The suite's own app allows no private address."""
    org = await make_org()
    body = {
        "issuer": "https://idp.example.com",
        "audience": AUDIENCE,
        "jwksUri": f"https://127.0.0.1:{idp.port}/jwks",
    }
    r = await client.put("/v1/organization/oidc", json=body, headers=org.headers)
    assert r.status_code == 422
    assert r.json()["ok"] is False
    assert r.json()["message"].startswith("jwksUri is refused: ")
    assert "loopback" in r.json()["message"]
    assert idp.jwks_requests == 0


async def test_http_urls_only_for_allowed_hosts(
    client: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    org = await make_org()
    r = await client.put(
        "/v1/organization/oidc",
        json={"issuer": idp.issuer, "audience": AUDIENCE, "jwksUri": idp.jwks_uri},
        headers=org.headers,
    )
    assert r.status_code == 422
    pointers = {d["pointer"] for d in r.json()["details"]}
    assert pointers == {"/issuer", "/jwksUri"}
    assert "https" in r.json()["message"]


async def test_malformed_urls_are_422(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    body = {"issuer": "https://[::1", "audience": AUDIENCE, "jwksUri": "ftp://keys.example"}
    r = await client.put("/v1/organization/oidc", json=body, headers=org.headers)
    assert r.status_code == 422
    assert [d["message"] for d in r.json()["details"]] == [
        "issuer is not a URL",
        "jwksUri must be an https URL",
    ]


async def test_jwks_uri_must_answer_a_key_set(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    org = await make_org()
    idp.jwks_body = {"issuer": idp.issuer}
    r = await _configure(sso, org, idp)
    assert r.status_code == 422
    assert r.json()["message"].startswith("jwksUri did not yield a JSON Web Key Set")
    idp.jwks_body = None
    r = await sso.put(
        "/v1/organization/oidc",
        json={"issuer": idp.issuer, "audience": AUDIENCE, "jwksUri": idp.url + "/missing"},
        headers=org.headers,
    )
    assert r.status_code == 422 and "HTTP 404" in r.json()["message"]


async def test_mapped_roles_must_exist(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    org = await make_org()
    r = await _configure(sso, org, idp, groupsClaim="groups", groupRoles={"ops": "Env-moderator"})
    assert r.status_code == 422
    assert r.json()["details"][0]["pointer"] == "/groupRoles/ops"
    made = await sso.post(
        "/v1/blueprints",
        json={"identifier": "Env", "title": "Env", "schema": {}},
        headers=org.headers,
    )
    assert made.status_code in (200, 201), made.text
    r = await _configure(
        sso,
        org,
        idp,
        groupsClaim="groups",
        groupRoles={"ops": "Env-moderator", "admins": "Admin", "all": "Member"},
    )
    assert r.status_code == 200, r.text
    r = await _configure(sso, org, idp, groupRoles={"admins": "Admin"})
    assert r.status_code == 422 and r.json()["details"][0]["pointer"] == "/groupsClaim"


def _as(token: str, org: Org | None = None) -> dict[str, str]:
    """Bearer headers, naming the org (X-Portolan-Org) when given."""
    headers = _bearer(token)
    if org is not None:
        headers["X-Portolan-Org"] = str(org.org_id)
    return headers


async def test_saving_settings_tells_nothing_of_other_orgs(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    # Another org using the same issuer and audience changes nothing in the answer: no
    # 409, no hint that the pair is in use.
    one, two = await make_org(), await make_org()
    first = await _configure(sso, one, idp)
    second = await _configure(sso, two, idp)
    assert first.status_code == second.status_code == 200, second.text
    strip = lambda r: {k: v for k, v in r.json()["oidc"].items() if k != "updatedAt"}  # noqa: E731
    assert strip(first) == strip(second)
    again = await _configure(sso, two, idp)  # saving again: the same
    assert again.status_code == 200 and strip(again) == strip(first)
    read = await sso.get("/v1/organization/oidc", headers=two.headers)
    assert read.status_code == 200 and strip(read) == strip(first)
    r = await sso.delete("/v1/organization/oidc", headers=one.headers)
    assert r.status_code == 200
    assert (await sso.get("/v1/organization/oidc", headers=two.headers)).status_code == 200


async def test_the_first_org_to_save_a_pair_locks_no_one_out(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider
) -> None:
    # A squatter saves the real tenant's issuer, audience and key set before it does.
    squatter, tenant = await make_org(), await make_org()
    await _configured(sso, squatter, idp)
    await _configured(sso, tenant, idp)
    email = _email()
    token = idp.token(AUDIENCE, email)
    # Naming its org, the tenant's user signs in to the tenant, and only there.
    r = await sso.get("/v1/organization", headers=_as(token, tenant))
    assert r.status_code == 200, r.text
    assert r.json()["organization"]["id"] == str(tenant.org_id)
    assert await _user(db, tenant.org_id, email) is not None
    assert await _user(db, squatter.org_id, email) is None
    # Unnamed, a token both orgs' settings verify goes to neither (never a guess).
    other = _email()
    r = await sso.get("/v1/organization", headers=_as(idp.token(AUDIENCE, other)))
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    assert r.json()["message"] == NOT_SIGNED_IN
    assert await _user(db, squatter.org_id, other) is None
    assert await _user(db, tenant.org_id, other) is None
    # The remembered sign-in stays the tenant's; the squatter's settings do not open its
    # door: the same token naming the squatter is the squatter's own user (its choice to
    # trust that provider), never the tenant's.
    r = await sso.get("/v1/organization", headers=_as(token, tenant))
    assert r.json()["organization"]["id"] == str(tenant.org_id)
    r = await sso.get("/v1/organization", headers=_as(token, squatter))
    assert r.json()["organization"]["id"] == str(squatter.org_id)


async def test_a_copycat_with_its_own_keys_neither_takes_nor_blocks_the_tokens(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider
) -> None:
    # The copycat names the tenant's issuer and audience with a key set of its own, and
    # signs tokens with that issuer: each org's tokens verify under its own keys only.
    fake = IdentityProvider()
    fake.add(rsa_key("k1"))  # the same kid as the tenant's provider
    with fake:
        copycat, tenant = await make_org(), await make_org()
        await _configured(sso, tenant, idp)
        r = await sso.put(
            "/v1/organization/oidc",
            json={"issuer": idp.issuer, "audience": AUDIENCE, "jwksUri": fake.jwks_uri},
            headers=copycat.headers,
        )
        assert r.status_code == 200, r.text
        email = _email()
        r = await sso.get("/v1/organization", headers=_bearer(idp.token(AUDIENCE, email)))
        assert r.status_code == 200, r.text
        assert r.json()["organization"]["id"] == str(tenant.org_id)
        forged = fake.token(AUDIENCE, email, iss=idp.issuer)
        r = await sso.get("/v1/organization", headers=_bearer(forged))
        assert r.status_code == 200, r.text
        assert r.json()["organization"]["id"] == str(copycat.org_id)
        # Naming the tenant, the copycat's token is refused like any other.
        r = await sso.get("/v1/organization", headers=_as(forged, tenant))
        assert r.status_code == 401 and r.json()["message"] == NOT_SIGNED_IN
        tenant_user = await _user(db, tenant.org_id, email)
        copycat_user = await _user(db, copycat.org_id, email)
        assert tenant_user is not None and copycat_user is not None
        assert tenant_user["id"] != copycat_user["id"]


async def test_refusals_are_the_same_whether_or_not_another_org_uses_the_issuer(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    # A prober signs tokens for someone's issuer and audience with keys of its own: the
    # answers before and after that org saved the pair (named or not) are the same.
    prober_key = rsa_key("k1")
    tenant = await make_org()

    async def answers() -> list[tuple[int, Any]]:
        out = []
        for kid, org in (("k1", None), ("unknown", None), ("k1", tenant), ("unknown", tenant)):
            token = idp.token(AUDIENCE, _email(), kid=kid, key=prober_key)
            r = await sso.get("/v1/organization", headers=_as(token, org))
            out.append((r.status_code, r.json()))
        return out

    before = await answers()
    await _configured(sso, tenant, idp)
    await asyncio.sleep(0.3)  # past the key set's refetch interval: a fetch is no tell
    after = await answers()
    assert before == after
    assert {status for status, _ in after} == {401}
    assert {body["message"] for _, body in after} == {NOT_SIGNED_IN}


async def test_a_named_org_must_be_the_tokens(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    one, two = await make_org(), await make_org()
    # Portolan's own tokens carry their org: naming another is refused.
    assert (await sso.get("/v1/organization", headers=_as(one.token, one))).status_code == 200
    r = await sso.get("/v1/organization", headers=_as(one.token, two))
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    r = await sso.get(
        "/v1/organization", headers={**_bearer(one.token), "X-Portolan-Org": "not-an-id"}
    )
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    # A provider's token naming an org whose settings are not its provider's.
    await _configured(sso, one, idp)
    token = idp.token(AUDIENCE, _email())
    r = await sso.get("/v1/organization", headers=_as(token, two))
    assert r.status_code == 401 and r.json()["message"] == NOT_SIGNED_IN
    assert (await sso.get("/v1/organization", headers=_as(token, one))).status_code == 200


# -- sign-in ------------------------------------------------------------------------------


async def test_valid_token_signs_in_and_provisions_the_user(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider
) -> None:
    org = await make_org()
    await _configured(sso, org, idp)
    email = _email()
    token = idp.token(AUDIENCE, email.upper())
    r = await sso.get("/v1/blueprints", headers=_bearer(token))
    assert r.status_code == 200, r.text
    user = await _user(db, org.org_id, email)
    assert user is not None
    assert user["status"] == "Active"
    assert list(user["providers"]) == ["oidc"]
    assert list(user["roles"]) == ["Member"]
    assert (user["first_name"], user["last_name"]) == ("Ada", "Lovelace King")
    assert user["last_login_at"] is not None
    audit = await sso.get("/v1/audit-log?origin=SSO", headers=org.headers)
    entries = [e for e in audit.json()["audits"] if e["resourceType"] == "user"]
    assert len(entries) == 1
    assert entries[0]["identifier"] == email
    assert entries[0]["action"] == "CREATE"
    assert entries[0]["trigger"]["by"]["userId"] == email


async def test_a_token_provisions_once_and_a_new_token_signs_in_again(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider
) -> None:
    org = await make_org()
    await _configured(sso, org, idp)
    email = _email()
    token = idp.token(AUDIENCE, email)
    answers = await asyncio.gather(
        *(sso.get("/v1/blueprints", headers=_bearer(token)) for _ in range(5))
    )
    assert {a.status_code for a in answers} == {200}
    first = await _user(db, org.org_id, email)
    assert first is not None
    assert (await sso.get("/v1/blueprints", headers=_bearer(token))).status_code == 200
    again = await _user(db, org.org_id, email)
    assert again is not None and again["last_login_at"] == first["last_login_at"]
    newer = idp.token(AUDIENCE, email)
    assert (await sso.get("/v1/blueprints", headers=_bearer(newer))).status_code == 200
    later = await _user(db, org.org_id, email)
    assert later is not None and later["last_login_at"] > first["last_login_at"]


async def test_ec_signed_token_signs_in(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    org = await make_org()
    idp.add(ec_key("ec1"))
    await _configured(sso, org, idp)
    r = await sso.get("/v1/blueprints", headers=_bearer(idp.token(AUDIENCE, _email(), kid="ec1")))
    assert r.status_code == 200, r.text


def _forged(idp: IdentityProvider, case: str, email: str) -> str:
    """A token the verifier must refuse, by case."""
    key = idp.keys["k1"]
    if case == "wrong audience":
        return idp.token("someone-else", email)
    if case == "wrong issuer":
        return idp.token(AUDIENCE, email, iss=idp.issuer + "/other")
    if case == "expired":
        return idp.token(AUDIENCE, email, iat=int(time.time()) - 600, exp=int(time.time()) - 60)
    if case == "no exp":
        return idp.token(AUDIENCE, email, exp=None)
    if case == "not yet valid":
        return idp.token(AUDIENCE, email, nbf=int(time.time()) + 600)
    if case == "issued in the future":
        return idp.token(AUDIENCE, email, iat=int(time.time()) + 600)
    if case == "alg none":
        return unsigned(idp.claims(AUDIENCE, email), {"alg": "none", "kid": "k1"})
    if case == "HS512 header":
        return unsigned(idp.claims(AUDIENCE, email), {"alg": "HS512", "kid": "k1"}) + "c2ln"
    if case == "HS256 with the public key":
        return hmac_signed(idp.claims(AUDIENCE, email), key.public_pem.encode(), "k1")
    if case == "another key, same kid":
        return idp.token(AUDIENCE, email, kid="k1", key=rsa_key("k1"))
    if case == "RS256 header on an EC key":
        idp.add(ec_key("ec1"))
        return idp.token(AUDIENCE, email, kid="ec1", key=rsa_key("ec1"))
    if case == "unverified email":
        return idp.token(AUDIENCE, email, email_verified=False)
    if case == "no email":
        return idp.token(AUDIENCE, email, email=None)
    if case == "tampered":
        head, body, signature = idp.token(AUDIENCE, email).split(".")
        other = idp.token(AUDIENCE, "mallory@example.com").split(".")[1]
        assert other != body
        return f"{head}.{other}.{signature}"
    raise AssertionError(case)


REFUSALS = {
    "wrong audience": "No organization signs in",
    "wrong issuer": "No organization signs in",
    "expired": "has expired",
    "no exp": 'missing required key "exp"',
    "not yet valid": "not yet valid (nbf)",
    "issued in the future": "issued in the future (iat)",
    "alg none": "algorithm is not accepted",
    "HS512 header": "algorithm is not accepted",
    # HS256 is the algorithm of Portolan's own tokens: checked with Portolan's key, it fails.
    "HS256 with the public key": "The access token is invalid",
    # Before a signature verifies, every refusal is the same (it tells of no org's settings).
    "another key, same kid": "No organization signs in",
    "RS256 header on an EC key": "No organization signs in",
    "unverified email": "has not verified the user's email",
    "no email": "has no 'email' claim",
    "tampered": "No organization signs in",
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_forged_or_unfit_tokens_are_refused(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider, case: str
) -> None:
    org = await make_org()
    await _configured(sso, org, idp)
    email = _email()
    r = await sso.get("/v1/blueprints", headers=_bearer(_forged(idp, case, email)))
    assert r.status_code == 401, r.text
    assert r.json()["ok"] is False
    assert REFUSALS[case] in r.json()["message"]
    assert await _user(db, org.org_id, email) is None


async def test_unknown_kid_fetches_the_rotated_key_set(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    org = await make_org()
    await _configured(sso, org, idp)
    email = _email()
    assert (
        await sso.get("/v1/blueprints", headers=_bearer(idp.token(AUDIENCE, email)))
    ).status_code == 200
    fetched = idp.jwks_requests
    idp.add(rsa_key("k2"))  # the provider rotates: the new key is announced
    await asyncio.sleep(0.3)  # past the refetch interval of this app (0.2 s)
    r = await sso.get("/v1/blueprints", headers=_bearer(idp.token(AUDIENCE, email, kid="k2")))
    assert r.status_code == 200, r.text
    assert idp.jwks_requests == fetched + 1


async def test_a_flood_of_unknown_kids_fetches_the_key_set_once_per_interval(
    fresh_settings: Callable[..., Settings], make_org: OrgFactory, idp: IdentityProvider
) -> None:
    interval = 2.0
    settings = _sso_settings(fresh_settings, oidc_jwks_refetch_seconds=interval)
    async with _serve(settings) as sso:
        org = await make_org()
        await _configured(sso, org, idp)  # fetched the set once
        await asyncio.sleep(interval + 0.1)
        tokens = [
            idp.token(AUDIENCE, _email(), kid=f"bogus-{i}", key=rsa_key(f"bogus-{i}"))
            for i in range(3)
        ] * 10
        before = idp.jwks_requests
        started = time.monotonic()
        answers = await asyncio.gather(
            *(sso.get("/v1/blueprints", headers=_bearer(t)) for t in tokens)
        )
        assert {a.status_code for a in answers} == {401}
        assert idp.jwks_requests - before == 1
        # A key announced within the interval is not fetched yet...
        idp.add(rsa_key("k2"))
        token = _bearer(idp.token(AUDIENCE, _email(), kid="k2"))
        assert time.monotonic() - started < interval
        assert (await sso.get("/v1/blueprints", headers=token)).status_code == 401
        assert idp.jwks_requests - before == 1
        # ...and is once the interval has passed.
        await asyncio.sleep(interval + 0.1)  # the fetch was after `started`, before now
        assert (await sso.get("/v1/blueprints", headers=token)).status_code == 200
        assert idp.jwks_requests - before == 2


async def test_known_keys_keep_working_while_the_provider_is_down(
    fresh_settings: Callable[..., Settings], make_org: OrgFactory, idp: IdentityProvider
) -> None:
    settings = _sso_settings(fresh_settings, oidc_jwks_cache_seconds=1.0)
    async with _serve(settings) as sso:
        org = await make_org()
        await _configured(sso, org, idp)
        idp.stop()
        await asyncio.sleep(1.1)  # the key set is stale: fetching it again fails
        token = idp.token(AUDIENCE, _email())
        assert (await sso.get("/v1/blueprints", headers=_bearer(token))).status_code == 200


async def test_orgs_sharing_an_issuer_each_get_their_own_user_and_data(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider
) -> None:
    one, two = await make_org(), await make_org()
    await _configured(sso, one, idp, audience="aud-one")
    await _configured(sso, two, idp, audience="aud-two")
    made = await sso.post(
        "/v1/blueprints",
        json={"identifier": "only-one", "title": "Only one", "schema": {}},
        headers=one.headers,
    )
    assert made.status_code in (200, 201), made.text
    email = _email()
    as_one = _bearer(idp.token("aud-one", email))
    as_two = _bearer(idp.token("aud-two", email))
    seen_one = await sso.get("/v1/blueprints", headers=as_one)
    seen_two = await sso.get("/v1/blueprints", headers=as_two)
    assert [b["identifier"] for b in seen_one.json()["blueprints"]] == ["only-one"]
    assert seen_two.json()["blueprints"] == []
    assert (await sso.get("/v1/blueprints/only-one", headers=as_two)).status_code == 404
    one_user, two_user = await _user(db, one.org_id, email), await _user(db, two.org_id, email)
    assert one_user is not None and two_user is not None and one_user["id"] != two_user["id"]
    org = await sso.get("/v1/organization", headers=as_two)
    assert org.json()["organization"]["id"] == str(two.org_id)
    # A token for both audiences names no single org, unless the request names one.
    both = idp.token(["aud-one", "aud-two"], email)
    assert (await sso.get("/v1/blueprints", headers=_bearer(both))).status_code == 401
    org = await sso.get("/v1/organization", headers=_as(both, two))
    assert org.json()["organization"]["id"] == str(two.org_id)


async def test_groups_give_teams_and_roles_and_a_later_sign_in_takes_them_back(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider
) -> None:
    org = await make_org()
    await _configured(
        sso,
        org,
        idp,
        groupsClaim="groups",
        groupTeams={"eng": "Engineering", "ops": "Operations"},
        groupRoles={"admins": "Admin"},
    )
    email = _email()
    first = _bearer(idp.token(AUDIENCE, email, groups=["eng", "ops", "admins", "other"]))
    assert (await sso.get("/v1/organization/oidc", headers=first)).status_code == 200
    me = (await sso.get("/v1/auth/me", headers=first)).json()["me"]
    assert (me["kind"], me["subject"], me["email"]) == ("user", email, email)
    assert sorted(me["roles"]) == ["Admin", "Member"]
    assert me["teams"] == ["Engineering", "Operations"]
    user = await _user(db, org.org_id, email)
    assert user is not None and list(user["idp_roles"]) == ["Admin"]
    assert await _memberships(db, org.org_id, email) == {
        ("Engineering", "idp"),
        ("Operations", "idp"),
    }
    async with db.system() as tx:
        provider = await tx.fetchval(
            "SELECT provider FROM teams WHERE org_id = $1 AND name = 'Operations'", org.org_id
        )
        assert provider == "oidc"
    # Memberships given through the API, one of them in a mapped team.
    async with db.tenant(org.org_id) as tx:
        await tx.execute("INSERT INTO teams (org_id, name) VALUES ($1, 'Platform')", org.org_id)
        await tx.execute(
            "INSERT INTO team_members (org_id, team_id, user_id, source) "
            "SELECT $1, t.id, $2, 'api' FROM teams t "
            "WHERE t.org_id = $1 AND t.name IN ('Platform', 'Operations')",
            org.org_id,
            user["id"],
        )
    later = _bearer(idp.token(AUDIENCE, email, groups=["eng"]))
    assert (await sso.get("/v1/organization/oidc", headers=later)).status_code == 403
    user = await _user(db, org.org_id, email)
    assert user is not None and list(user["idp_roles"]) == []
    assert await _memberships(db, org.org_id, email) == {
        ("Engineering", "idp"),
        ("Operations", "api"),
        ("Platform", "api"),
    }
    audit = await sso.get("/v1/audit-log?origin=SSO", headers=org.headers)
    removed = [
        e
        for e in audit.json()["audits"]
        if e["resourceType"] == "team" and "memberRemoved" in (e["diff"] or {})
    ]
    assert [e["identifier"] for e in removed] == ["Operations"]


async def test_changed_settings_apply_to_a_token_already_in_use(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    org = await make_org()
    await _configured(sso, org, idp, groupsClaim="groups")
    token = _bearer(idp.token(AUDIENCE, _email(), groups=["admins"]))
    assert (await sso.get("/v1/organization/oidc", headers=token)).status_code == 403
    await _configured(sso, org, idp, groupsClaim="groups", groupRoles={"admins": "Admin"})
    assert (await sso.get("/v1/organization/oidc", headers=token)).status_code == 200
    removed = await sso.delete("/v1/organization/oidc", headers=org.headers)
    assert removed.status_code == 200
    assert (await sso.get("/v1/blueprints", headers=token)).status_code == 401


async def test_a_disabled_user_is_refused(
    sso: httpx.AsyncClient, make_org: OrgFactory, db: Database, idp: IdentityProvider
) -> None:
    org = await make_org()
    await _configured(sso, org, idp)
    email = _email()
    token = _bearer(idp.token(AUDIENCE, email))
    assert (await sso.get("/v1/blueprints", headers=token)).status_code == 200
    async with db.tenant(org.org_id) as tx:
        await tx.execute(
            "UPDATE users SET status = 'Disabled' WHERE org_id = $1 AND email = $2",
            org.org_id,
            email,
        )
    assert (await sso.get("/v1/blueprints", headers=token)).status_code == 401
    fresh = _bearer(idp.token(AUDIENCE, email))
    r = await sso.get("/v1/blueprints", headers=fresh)
    assert r.status_code == 401 and r.json()["error"] == "unknown_user"
    user = await _user(db, org.org_id, email)
    assert user is not None and user["status"] == "Disabled"


async def test_portolan_tokens_still_work_beside_sso(
    sso: httpx.AsyncClient, make_org: OrgFactory, idp: IdentityProvider
) -> None:
    org = await make_org()
    await _configured(sso, org, idp)
    assert (await sso.get("/v1/blueprints", headers=org.headers)).status_code == 200
    r = await sso.get("/v1/blueprints", headers=_bearer("not.a.token"))
    assert r.status_code == 401


async def test_browsers_may_name_the_org(client: httpx.AsyncClient) -> None:
    r = await client.options(
        "/v1/organization",
        headers={
            "Origin": "https://portal.example.com",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, x-portolan-org",
        },
    )
    assert r.status_code == 200, r.text
    assert "x-portolan-org" in r.headers["access-control-allow-headers"].lower()
