"""The command line's API client, against a live server."""

from __future__ import annotations

import asyncio

import pytest

from app.remote import ApiError, Client, Credentials
from tests.conftest import LiveServer, OrgFactory


async def test_the_client_signs_in_reads_and_reports_errors(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    creds = Credentials(
        url=live_server.url, client_id=org.client_id, client_secret=org.client_secret
    )

    def work() -> None:
        with Client(creds) as client:
            body = {"identifier": "svc", "title": "Service", "schema": {"properties": {}}}
            assert client.post("/v1/blueprints", body)["blueprint"]["identifier"] == "svc"
            assert [b["identifier"] for b in client.get("/v1/blueprints")["blueprints"]] == ["svc"]
            with pytest.raises(ApiError) as caught:
                client.get("/v1/blueprints/nope")
            assert caught.value.status == 404 and caught.value.code == "not_found"
            gone = client.get("/v1/blueprints/nope", ok_statuses=(404,))
            assert gone["ok"] is False
        bad = Credentials(url=live_server.url, client_id=org.client_id, client_secret="wrong")
        with Client(bad) as client, pytest.raises(ApiError) as caught:
            client.get("/v1/blueprints")
        assert caught.value.status == 401

    await asyncio.to_thread(work)
