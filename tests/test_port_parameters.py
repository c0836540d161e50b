"""No query parameter is silently ignored: every parameter Port's API declares on an
operation Portolan serves is declared by Portolan or listed, with its reason, in
docs/port-unsupported-query-parameters.json (and then answered 422); and any route refuses a
query parameter it does not declare (422 `unknown_query_parameter` naming it), except the
habitual ones and the routes that read whatever they are sent."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from app.db.routing import HABITUAL_PREFIXES, HABITUAL_QUERY, TransactionRoute
from app.kit.http import iter_routes
from tests.conftest import OrgFactory

ROOT = Path(__file__).resolve().parent.parent
PORT = ROOT.parent / "shared" / "reference" / "port-openapi.json"
# Port's operations and the query parameters each declares, taken from Port's API
# description (the file above, where it is beside the checkout): what the test reads.
EXTRACT = ROOT / "tests" / "data" / "port-query-parameters.json"
LISTED = ROOT / "docs" / "port-unsupported-query-parameters.json"
METHODS = ("get", "put", "post", "patch", "delete")


def _shape(path: str) -> str:
    """A path with its parameters' names left out: Port and Portolan name them apart."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def _query(document: dict[str, Any], item: dict[str, Any], op: dict[str, Any]) -> list[str]:
    names = []
    for param in [*item.get("parameters", []), *op.get("parameters", [])]:
        if "$ref" in param:
            target: Any = document
            for part in param["$ref"].split("/")[1:]:
                target = target[part]
            param = target
        if param.get("in") == "query":
            names.append(param["name"])
    return names


def _extract(document: dict[str, Any]) -> dict[str, list[str]]:
    return {
        f"{method.upper()} {path}": _query(document, item, item[method])
        for path, item in sorted(document["paths"].items())
        for method in METHODS
        if method in item
    }


def _port_operations() -> dict[str, list[str]]:
    """Port's operations -> their query parameters. Where Port's description is at hand,
    the committed extract must be what it says (regenerate with `python -m
    tests.test_port_parameters`)."""
    extract: dict[str, list[str]] = json.loads(EXTRACT.read_text())
    if PORT.exists():
        assert _extract(json.loads(PORT.read_text())) == extract, (
            f"{EXTRACT} is stale: regenerate it with python -m tests.test_port_parameters"
        )
    return extract


def _served(app: FastAPI) -> dict[tuple[str, str], set[str]]:
    """Portolan's operations (method, path shape) with the query parameters each declares."""
    served: dict[tuple[str, str], set[str]] = {}
    for path, item in app.openapi()["paths"].items():
        for method, op in item.items():
            served[(method, _shape(path))] = set(_query({}, item, op))
    return served


def _listed() -> dict[str, dict[str, str]]:
    doc = json.loads(LISTED.read_text())
    return {key: value for key, value in doc.items() if not key.startswith("_")}


def test_every_port_query_parameter_is_declared_or_listed(app: FastAPI) -> None:
    served = _served(app)
    listed = _listed()
    problems = []
    seen: set[str] = set()
    for key, names in _port_operations().items():
        method, path = key.split(" ", 1)
        declared = served.get((method.lower(), _shape(path)))
        if declared is None:
            continue
        seen.add(key)
        reasons = listed.get(key, {})
        for name in names:
            if name in declared and name in reasons:
                problems.append(f"{key}: {name} is declared, yet listed as unsupported")
            elif name not in declared and not reasons.get(name, "").strip():
                problems.append(f"{key}: {name} is neither declared nor listed with a reason")
        for name in set(reasons) - set(names):
            problems.append(f"{key}: {name} is listed but Port does not declare it")
    problems += [
        f"{key}: listed, but not an operation Portolan serves" for key in set(listed) - seen
    ]
    assert problems == [], "\n".join(sorted(problems))


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_each_listed_parameter_is_refused_as_not_supported(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    wrong = []
    for key, reasons in _listed().items():
        method, path = key.split(" ", 1)
        for name in reasons:
            r = await client.request(method, _url(path), params={name: "1"}, headers=org.headers)
            body = r.json()
            if r.status_code != 422 or body.get("error") != "unknown_query_parameter":
                wrong.append(f"{key} ?{name}: {r.status_code} {r.text[:200]}")
            elif [d["parameter"] for d in body["details"]] != [name]:
                wrong.append(f"{key} ?{name}: named {body['details']}")
    assert wrong == [], "\n".join(wrong)


async def test_every_route_refuses_a_query_parameter_it_does_not_declare(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    wrong = []
    for route in iter_routes(app.routes):
        if not isinstance(route, TransactionRoute) or route.query_names is None:
            continue
        for method in route.methods:
            url = re.sub(r"\{[^}]+\}", "x", route.path)
            r = await client.request(method, url, params={"portolan_probe": "1"})
            if r.status_code != 422 or r.json().get("error") != "unknown_query_parameter":
                wrong.append(f"{method} {route.path}: {r.status_code} {r.text[:120]}")
    assert wrong == [], "\n".join(wrong)


async def test_an_unknown_query_parameter_is_named_with_the_others(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.get(
        "/v1/blueprints", params={"colour": "red", "sise": "2"}, headers=org.headers
    )
    assert r.status_code == 422
    body = r.json()
    assert (body["ok"], body["error"]) == (False, "unknown_query_parameter")
    assert [d["parameter"] for d in body["details"]] == ["colour", "sise"]
    assert "'colour'" in body["message"] and "'sise'" in body["message"]


async def test_declared_parameters_still_act(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.get("/v1/audit-log", params={"limit": "1"}, headers=org.headers)
    assert r.status_code == 200, r.text


async def test_habitual_parameters_are_taken_by_any_route(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for name in [*sorted(HABITUAL_QUERY), *(f"{p}resync_id" for p in HABITUAL_PREFIXES)]:
        r = await client.get("/v1/blueprints", params={name: "1712345678"}, headers=org.headers)
        assert r.status_code == 200, (name, r.text)


async def test_an_incoming_webhook_takes_any_query_parameter(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.post(
        "/v1/webhooks",
        json={"identifier": "hook", "title": "Hook", "mappings": []},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    key = r.json()["integration"]["webhookKey"]
    r = await client.post(f"/v1/webhooks/ingest/{key}?source=github&ref=main", json={})
    assert r.status_code == 202, r.text


_VERSIONED = (
    ("GET", "/v1/actions", None, 200),
    ("GET", "/v1/actions/runs", None, 200),
    ("GET", "/v1/actions/runs/r_none", None, 404),
    ("PATCH", "/v1/actions/runs/r_none", {"statusLabel": "halfway"}, 404),
    ("PATCH", "/v1/actions/runs/r_none/approval", {"status": "APPROVE"}, 404),
)


async def test_version_v2_is_what_the_action_routes_answer(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for method, url, body, status in _VERSIONED:
        r = await client.request(
            method, url, params={"version": "v2"}, json=body, headers=org.headers
        )
        assert r.status_code == status, (method, url, r.text)


async def test_version_v1_is_not_supported(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    for method, url, body, _ in _VERSIONED:
        r = await client.request(
            method, url, params={"version": "v1"}, json=body, headers=org.headers
        )
        assert r.status_code == 422, (method, url, r.text)
        assert r.json()["error"] == "not_supported"
    r = await client.get("/v1/actions", params={"version": "v3"}, headers=org.headers)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


if __name__ == "__main__":
    EXTRACT.write_text(json.dumps(_extract(json.loads(PORT.read_text())), indent=1) + "\n")
