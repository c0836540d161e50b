"""Every error leaves as Port's JSON error body, with a request id, never HTML or a 500."""

from __future__ import annotations

import httpx

from tests.conftest import OrgFactory


def _is_error_body(response: httpx.Response, code: str) -> bool:
    body = response.json()
    return (
        response.headers["content-type"].startswith("application/json")
        and body["ok"] is False
        and body["error"] == code
        and isinstance(body["message"], str)
        and body["message"] != ""
    )


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert _is_error_body(response, "not_found")


async def test_wrong_method_is_json_405(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/auth/access_token")
    assert response.status_code == 405
    assert _is_error_body(response, "method_not_allowed")


async def test_bad_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/auth/access_token",
        content=b'{"clientId": ',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert _is_error_body(response, "invalid_json")


async def test_schema_mismatch_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/auth/access_token", json={"clientId": "abc"})
    assert response.status_code == 422
    assert _is_error_body(response, "invalid_request")
    assert "clientSecret" in response.json()["message"]


async def test_unknown_field_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/auth/access_token", json={"clientId": "a", "clientSecret": "b", "extra": 1}
    )
    assert response.status_code == 422


async def test_body_over_one_mib_is_413(client: httpx.AsyncClient) -> None:
    payload = b'{"clientId": "' + b"a" * (1024 * 1024) + b'", "clientSecret": "x"}'
    response = await client.post(
        "/v1/auth/access_token", content=payload, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert _is_error_body(response, "payload_too_large")


async def test_chunked_body_over_one_mib_is_413(client: httpx.AsyncClient) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b"x" * (64 * 1024)

    response = await client.post(
        "/v1/auth/access_token", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert _is_error_body(response, "payload_too_large")


async def test_responses_carry_a_request_id(client: httpx.AsyncClient) -> None:
    ok = await client.get("/healthz")
    missing = await client.get("/nope")
    assert len(ok.headers["x-request-id"]) >= 16
    assert missing.headers["x-request-id"] != ok.headers["x-request-id"]


async def test_a_sane_incoming_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-Id": "ci-run-42"})
    assert response.headers["x-request-id"] == "ci-run-42"


async def test_an_unsafe_incoming_request_id_is_replaced(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
    assert response.headers["x-request-id"] != "bad id\twith spaces"


async def test_request_logs_are_json_with_the_request_id(
    client: httpx.AsyncClient,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    import json
    import logging

    from app.kit.logging import JsonFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("portolan.http")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        await client.get("/healthz", headers={"X-Request-Id": "trace-me-123"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    entry = next(line for line in lines if line.get("request_id") == "trace-me-123")
    assert entry["msg"] == "request" and entry["status"] == 200 and entry["route"] == "/healthz"


async def test_cors_preflight_allows_configured_origin(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/v1/organization",
        headers={
            "Origin": "https://portal.example.com",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://portal.example.com"


async def test_cors_refuses_unknown_origin(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/v1/organization",
        headers={"Origin": "https://evil.example.net", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in response.headers


async def test_unexpected_failure_is_a_json_500_without_internals(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    app,  # type: ignore[no-untyped-def]
) -> None:
    # Break the database handle for one request: the client must get a generic JSON 500.
    org = await make_org()
    original = app.state.db

    class Broken:
        async def begin_tenant(self, org_id, generic_plans=False):  # type: ignore[no-untyped-def]
            raise RuntimeError("secret internal detail")

    app.state.db = Broken()
    try:
        response = await client.get("/v1/organization", headers=org.headers)
    finally:
        app.state.db = original
    assert response.status_code == 500
    assert response.json() == {
        "ok": False,
        "error": "internal_error",
        "message": "Internal server error",
    }
    assert "secret internal detail" not in response.text


async def test_every_route_commits_through_transaction_route(app) -> None:  # type: ignore[no-untyped-def]
    from fastapi.routing import APIRoute

    from app.db.routing import TransactionRoute
    from app.kit.http import iter_routes

    api_routes = [r for r in iter_routes(app.routes) if isinstance(r, APIRoute)]
    assert api_routes and all(isinstance(r, TransactionRoute) for r in api_routes)


async def test_405_lists_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    response = await client.request("OPTIONS", "/v1/blueprints")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"


async def test_security_headers_on_every_response(client: httpx.AsyncClient) -> None:
    """No sniffing, framing, referrer or caching; the API allows no active content (CSP);
    the docs page keeps its scripts."""
    for response in (
        await client.get("/healthz"),
        await client.get("/v1/organization"),  # 401
        await client.get("/v1/nowhere"),  # 404
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "content-security-policy" not in docs.headers
