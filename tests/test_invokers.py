"""Outbound calls of action runs, against real servers on 127.0.0.1 (tests/receivers.py):
the client's address pinning and guard, and every branch of the WEBHOOK, GITHUB and
GITLAB invokers."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.dispatch.invokers import Context, Outcome, invoke
from app.kit import client as client_module
from app.kit import outbound
from app.kit.client import Client
from app.kit.outbound import Allowed, Refused, Target
from tests.receivers import GitHubReceiver, GitLabReceiver, WebhookReceiver

LOCAL = Allowed.parse("127.0.0.1/32")
NOBODY = Allowed.parse(None)
SIGNING_SECRET = "whsec_" + "c2lnbmluZy1zZWNyZXQtZm9yLXRlc3Rz"
GITHUB_TOKEN = "ghp_TopSecretGitHubToken0123456789"
GITLAB_TOKEN = "glptt-TopSecretTriggerToken0123"


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with Client() as c:
        yield c


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(SIGNING_SECRET) as receiver:
        yield receiver


@pytest.fixture
def github() -> Iterator[GitHubReceiver]:
    workflows = {("acme", "deployer", "deploy.yml"), ("acme", "strict", "ci.yml")}
    declared = {("acme", "strict", "ci.yml"): {"service", "env"}}
    with GitHubReceiver({GITHUB_TOKEN}, workflows, declared=declared) as receiver:
        yield receiver


@pytest.fixture
def gitlab() -> Iterator[GitLabReceiver]:
    tokens = {"platform/deployer": GITLAB_TOKEN}
    with GitLabReceiver(tokens, refs={"main", "release"}) as receiver:
        yield receiver


def context(
    client: Client,
    *,
    github: GitHubReceiver | None = None,
    gitlab: GitLabReceiver | None = None,
    secrets: dict[str, str] | None = None,
    inputs: dict[str, Any] | None = None,
    timeout: float = 5.0,
    allowed: Allowed = LOCAL,
    run_id: str = "r_abc123",
) -> Context:
    return Context(
        run_id=run_id,
        signing_secret=SIGNING_SECRET,
        secrets={"GITHUB_TOKEN": GITHUB_TOKEN, "GITLAB_TRIGGER_TOKEN": GITLAB_TOKEN}
        if secrets is None
        else secrets,
        allowed=allowed,
        github_api_url=github.url if github else "https://api.github.com",
        gitlab_api_url=gitlab.api_url if gitlab else "https://gitlab.com/api/v4",
        timeout=timeout,
        inputs=inputs if inputs is not None else {"service": "api"},
        client=client,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(monkeypatch: pytest.MonkeyPatch, host: str, address: str = "127.0.0.1") -> list[str]:
    """Make `host` (which does not resolve) check out as `address`; the URLs checked."""
    seen: list[str] = []

    async def check(url: str, allowed: Allowed) -> Target:
        parts = urlsplit(url)
        assert parts.hostname == host
        seen.append(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return Target(url, parts.scheme, host, port, ipaddress.ip_address(address))

    monkeypatch.setattr(outbound, "check", check)
    return seen


# ---------------------------------------------------------------------------------------
# The client


async def test_the_client_refuses_private_addresses_unless_allowed(
    client: Client, webhook: WebhookReceiver
) -> None:
    with pytest.raises(Refused, match="PORTOLAN_OUTBOUND_ALLOW"):
        await client.send("GET", webhook.url, headers={}, content=None, allowed=NOBODY, timeout=5)
    assert webhook.requests == []
    response = await client.send(
        "GET", webhook.url + "/x", headers={}, content=None, allowed=LOCAL, timeout=5
    )
    assert response.status_code == 401  # unsigned; the receiver answered


async def test_the_client_connects_to_the_checked_address_with_the_original_host(
    client: Client, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name does not resolve: the request can only arrive through the checked address.
    checked = pin(monkeypatch, "hooks.invalid")
    url = f"http://hooks.invalid:{webhook.port}/path?q=1"
    response = await client.send(
        "POST",
        url,
        headers={"X-Test": "1", "Host": "evil.test", "Content-Length": "999"},
        content=b"{}",
        allowed=NOBODY,
        timeout=5,
    )
    assert checked == [url]
    assert response.status_code == 401
    (request,) = webhook.requests
    assert request.headers["host"] == f"hooks.invalid:{webhook.port}"
    assert request.headers["x-test"] == "1"
    assert request.path == "/path" and request.query == {"q": "1"}
    assert request.body == b"{}"


async def test_the_client_reuses_connections_to_a_host(
    client: Client, webhook: WebhookReceiver
) -> None:
    for _ in range(3):
        await client.send("GET", webhook.url, headers={}, content=None, allowed=LOCAL, timeout=5)
    assert len({request.client_port for request in webhook.requests}) == 1


async def test_the_client_does_not_follow_redirects(client: Client, github: GitHubReceiver) -> None:
    github.fail_next(1, 302, headers={"Location": github.url + "/elsewhere"})
    response = await client.send(
        "GET", github.url, headers={}, content=None, allowed=LOCAL, timeout=5
    )
    assert response.status_code == 302
    assert len(github.requests) == 1


def _dripping_server(stop: threading.Event) -> tuple[socket.socket, threading.Thread]:
    """Answers headers, then one body byte every 50 ms: no single read ever waits long."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


async def test_the_client_bounds_the_whole_call(client: Client) -> None:
    stop = threading.Event()
    listener, thread = _dripping_server(stop)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    started = time.monotonic()
    try:
        with pytest.raises(httpx.TimeoutException):
            await client.send("GET", url, headers={}, content=None, allowed=LOCAL, timeout=0.5)
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


async def test_the_shared_client_is_per_loop(webhook: WebhookReceiver) -> None:
    assert client_module.shared() is client_module.shared()
    response = await client_module.send(
        "GET", webhook.url, headers={}, content=None, allowed=LOCAL, timeout=5
    )
    assert response.status_code == 401
    await client_module.aclose_shared()


def _certificate(name: str, directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("served_name", ["hooks.invalid", "other.invalid"])
async def test_https_verifies_the_certificate_against_the_url_host(
    monkeypatch: pytest.MonkeyPatch, served_name: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = _certificate(served_name, Path(tmp))
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(cert, key)
        names: list[str | None] = []
        server_tls.sni_callback = lambda _sock, name, _ctx: names.append(name)
        trust = ssl.create_default_context(cafile=str(cert))
        pin(monkeypatch, "hooks.invalid")
        with WebhookReceiver(SIGNING_SECRET, ssl_context=server_tls) as receiver:
            url = f"https://hooks.invalid:{receiver.port}/tls"
            async with Client(verify=trust) as tls_client:
                if served_name == "hooks.invalid":
                    response = await tls_client.send(
                        "GET", url, headers={}, content=None, allowed=NOBODY, timeout=5
                    )
                    assert response.status_code == 401
                    assert receiver.requests[0].headers["host"] == f"hooks.invalid:{receiver.port}"
                else:
                    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                        await tls_client.send(
                            "GET", url, headers={}, content=None, allowed=NOBODY, timeout=5
                        )
                    assert receiver.requests == []
                    ctx = context(tls_client, allowed=NOBODY)
                    outcome = await invoke({"type": "WEBHOOK", "url": url}, ctx)
                    assert outcome.state == "failure"
                    assert "certificate could not be verified" in outcome.message
        assert names and set(names) == {"hooks.invalid"}


# ---------------------------------------------------------------------------------------
# WEBHOOK


async def test_webhook_delivers_a_signed_compact_body_and_is_accepted(
    client: Client, webhook: WebhookReceiver
) -> None:
    webhook.respond(202, {"queued": True})
    body = {"port_context": {"runId": "r_abc123"}, "inputs": {"name": "api", "n": 2}}
    method = {
        "type": "WEBHOOK",
        "url": webhook.url + "/hooks/deploy",
        "headers": {"X-Custom": "yes", "RUN_ID": "r_abc123", "X-Port-Signature": "forged"},
        "body": body,
    }
    outcome = await invoke(method, context(client))
    assert outcome == Outcome(
        "accepted", "the webhook accepted the run (202 Accepted)", status_code=202
    )
    (delivery,) = await webhook.wait_for(1)
    assert delivery.run_id == "r_abc123"
    assert delivery.method == "POST" and delivery.path == "/hooks/deploy"
    assert delivery.raw == json.dumps(body, separators=(",", ":")).encode()
    assert delivery.body == body
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["x-custom"] == "yes" and delivery.headers["run_id"] == "r_abc123"
    assert delivery.headers["x-port-signature"].startswith("v1,")
    assert webhook.rejected == []


async def test_webhook_method_headers_and_default_body(
    client: Client, webhook: WebhookReceiver
) -> None:
    method = {
        "type": "WEBHOOK",
        "url": webhook.url,
        "method": "put",
        "headers": {"Content-Type": "application/vnd.acme+json", "X-Count": 3, "X-None": None},
    }
    outcome = await invoke(method, context(client))
    assert outcome.state == "accepted"
    (delivery,) = webhook.deliveries
    assert delivery.method == "PUT"
    assert delivery.raw == b"{}"
    assert delivery.headers["content-type"] == "application/vnd.acme+json"
    assert delivery.headers["x-count"] == "3" and "x-none" not in delivery.headers


async def test_the_receiver_rejects_a_wrong_signature(
    client: Client, webhook: WebhookReceiver
) -> None:
    webhook.signing_secret = "another-secret"
    outcome = await invoke({"type": "WEBHOOK", "url": webhook.url}, context(client))
    assert outcome.state == "failure"
    assert outcome.status_code == 401
    assert "X-Port-Signature does not match" in outcome.message
    assert webhook.deliveries == [] and len(webhook.rejected) == 1


async def test_synchronized_webhook_success_keeps_the_response(
    client: Client, webhook: WebhookReceiver
) -> None:
    webhook.respond(200, {"deployed": "v1.2.3", "url": "https://app.test"})
    for synchronized in (True, "true"):
        method = {"type": "WEBHOOK", "url": webhook.url, "synchronized": synchronized}
        outcome = await invoke(method, context(client))
        assert outcome.state == "success"
        assert outcome.response == {"deployed": "v1.2.3", "url": "https://app.test"}
        assert outcome.status_code == 200
    webhook.respond(201, b"plain text answer")
    outcome = await invoke(
        {"type": "WEBHOOK", "url": webhook.url, "synchronized": True}, context(client)
    )
    assert (outcome.state, outcome.response) == ("success", "plain text answer")


async def test_synchronized_webhook_responses_are_truncated(
    client: Client, webhook: WebhookReceiver
) -> None:
    webhook.respond(200, {"blob": "x" * 100_000})
    outcome = await invoke(
        {"type": "WEBHOOK", "url": webhook.url, "synchronized": True}, context(client)
    )
    assert outcome.state == "success"
    assert isinstance(outcome.response, str) and len(outcome.response) == 64 * 1024
    assert outcome.response.startswith('{"blob": "xxx')


async def test_synchronized_webhook_failure(client: Client, webhook: WebhookReceiver) -> None:
    webhook.respond(422, {"error": "version not found"})
    outcome = await invoke(
        {"type": "WEBHOOK", "url": webhook.url, "synchronized": True}, context(client)
    )
    assert outcome.state == "failure"
    assert outcome.response == {"error": "version not found"}
    assert outcome.message.startswith("the webhook answered 422 Unprocessable Entity")
    assert "version not found" in outcome.message


async def test_asynchronous_webhook_4xx_is_a_failure(
    client: Client, webhook: WebhookReceiver
) -> None:
    webhook.fail_next(1, 404, body={"detail": "no such hook"})
    outcome = await invoke({"type": "WEBHOOK", "url": webhook.url}, context(client))
    assert outcome.state == "failure" and outcome.status_code == 404
    assert "404 Not Found" in outcome.message and "no such hook" in outcome.message


@pytest.mark.parametrize("synchronized", [False, True])
@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [
        (503, {}, None),
        (500, {}, None),
        (429, {"Retry-After": "7"}, 7.0),
        (408, {}, None),
    ],
)
async def test_webhook_transient_answers_are_retried(
    client: Client,
    webhook: WebhookReceiver,
    status: int,
    headers: dict[str, str],
    retry_after: float | None,
    synchronized: bool,
) -> None:
    webhook.fail_next(1, status, headers=headers)
    method = {"type": "WEBHOOK", "url": webhook.url, "synchronized": synchronized}
    outcome = await invoke(method, context(client))
    assert outcome.state == "retry"
    assert outcome.status_code == status
    assert outcome.retry_after == retry_after
    assert f"answered {status}" in outcome.message


async def test_webhook_retry_after_as_a_date(client: Client, webhook: WebhookReceiver) -> None:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
    webhook.fail_next(1, 503, headers={"Retry-After": when.strftime("%a, %d %b %Y %H:%M:%S GMT")})
    outcome = await invoke({"type": "WEBHOOK", "url": webhook.url}, context(client))
    assert outcome.state == "retry"
    assert outcome.retry_after is not None and 100 < outcome.retry_after <= 120


async def test_a_retried_delivery_keeps_its_webhook_id(
    client: Client, webhook: WebhookReceiver
) -> None:
    webhook.fail_until(time.monotonic() + 60, 503)
    method = {"type": "WEBHOOK", "url": webhook.url, "body": {"n": 1}}
    assert (await invoke(method, context(client))).state == "retry"
    webhook.fail_until(0)
    assert (await invoke(method, context(client))).state == "accepted"
    assert (await invoke(method, context(client))).state == "accepted"  # a duplicate
    assert [r.status for r in webhook.requests] == [503, 200, 200]
    assert webhook.unique_run_ids() == {"r_abc123"}


async def test_the_webhook_receiver_bookkeeping(client: Client) -> None:
    with WebhookReceiver(SIGNING_SECRET, status=502) as receiver:
        method = {"type": "WEBHOOK", "url": receiver.url}
        assert (await invoke(method, context(client, run_id="r_1"))).state == "retry"
        receiver.respond(200)
        receiver.fail_next(1, 503)
        assert (await invoke(method, context(client, run_id="r_2"))).state == "retry"
        assert (await invoke(method, context(client, run_id="r_2"))).state == "accepted"
        receiver.signing_secret = "rotated"
        assert (await invoke(method, context(client, run_id="r_3"))).state == "failure"
        assert [d.status for d in await receiver.wait_for(3)] == [502, 503, 200]
        assert len(await receiver.wait_requests(4)) == 4
        assert await receiver.wait_unique(1) == {"r_2"}
        assert (receiver.refused, receiver.signature_failures) == (2, 1)
        with pytest.raises(TimeoutError):
            await receiver.wait_unique(2, timeout=0.1)


async def test_webhook_redirect_is_a_failure(client: Client, webhook: WebhookReceiver) -> None:
    webhook.fail_next(1, 301, headers={"Location": "http://10.0.0.1/"})
    outcome = await invoke({"type": "WEBHOOK", "url": webhook.url}, context(client))
    assert outcome.state == "failure"
    assert "redirects are not followed" in outcome.message


async def test_webhook_timeout_is_retried(client: Client, webhook: WebhookReceiver) -> None:
    webhook.delay = 1.0
    outcome = await invoke({"type": "WEBHOOK", "url": webhook.url}, context(client, timeout=0.3))
    assert outcome.state == "retry"
    assert outcome.message == "the webhook timed out after 0.3 s"
    assert outcome.status_code is None


async def test_webhook_connection_refused_is_retried(client: Client) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    outcome = await invoke({"type": "WEBHOOK", "url": url}, context(client))
    assert outcome.state == "retry"
    assert outcome.message == "could not connect to the webhook: connection refused"


async def test_webhook_refused_by_the_guard_is_a_failure(
    client: Client, webhook: WebhookReceiver
) -> None:
    outcome = await invoke({"type": "WEBHOOK", "url": webhook.url}, context(client, allowed=NOBODY))
    assert outcome.state == "failure"
    assert "refused" in outcome.message and "PORTOLAN_OUTBOUND_ALLOW" in outcome.message
    assert webhook.requests == []
    outcome = await invoke({"type": "WEBHOOK", "url": "file:///etc/passwd"}, context(client))
    assert outcome.state == "failure" and "only http and https" in outcome.message


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"type": "WEBHOOK"}, "the webhook has no url"),
        ({"type": "WEBHOOK", "url": "http://127.0.0.1/", "method": "TRACE"}, "TRACE"),
        ({"type": "WEBHOOK", "url": "http://127.0.0.1/", "headers": {"A": "x\r\nB: y"}}, "header"),
        ({"type": "WEBHOOK", "url": "http://127.0.0.1/", "headers": {"a b": "x"}}, "header"),
        ({"type": "KAFKA", "payload": {}}, "KAFKA is not performed here"),
    ],
)
async def test_invalid_methods_fail_without_a_call(
    client: Client, method: dict[str, Any], message: str
) -> None:
    outcome = await invoke(method, context(client))
    assert outcome.state == "failure"
    assert message in outcome.message


async def test_secrets_in_a_webhook_url_do_not_reach_the_message(client: Client) -> None:
    secret = "hookkey0123456789abcdefsecret"
    ctx = context(client, secrets={"HOOK_KEY": secret})
    outcome = await invoke({"type": "WEBHOOK", "url": f"http://{secret}.invalid/hook"}, ctx)
    assert outcome.state == "failure"
    assert outcome.message == "the webhook URL was refused: '***.invalid' does not resolve"


async def test_a_secret_echoed_by_the_receiver_is_masked_before_the_message_is_cut(
    client: Client, webhook: WebhookReceiver
) -> None:
    secret = "echoed-secret-0123456789abcdef"
    webhook.fail_next(1, 400, body=("x" * 180 + secret + " trailing").encode())
    ctx = context(client, secrets={"API_KEY": secret})
    outcome = await invoke({"type": "WEBHOOK", "url": webhook.url}, ctx)
    assert outcome.state == "failure"
    assert secret[:6] not in outcome.message
    assert "***" in outcome.message


# ---------------------------------------------------------------------------------------
# GITHUB


def github_method(**overrides: Any) -> dict[str, Any]:
    return {
        "type": "GITHUB",
        "org": "acme",
        "repo": "deployer",
        "workflow": "deploy.yml",
        "workflowInputs": {
            "service": "api",
            "replicas": 3,
            "dry_run": False,
            "port_context": {"runId": "r_abc123", "entity": {"id": "svc"}},
            "tags": ["a", "b"],
            "skipped": None,
            "ref": "release/1.2",
        },
        **overrides,
    }


async def test_github_dispatches_the_workflow(client: Client, github: GitHubReceiver) -> None:
    outcome = await invoke(github_method(), context(client, github=github))
    assert outcome.state == "accepted"
    assert outcome.status_code == 204
    assert "dispatched GitHub workflow deploy.yml on acme/deployer" in outcome.message
    assert outcome.link is None  # not api.github.com
    (dispatch,) = github.dispatches
    assert dispatch.path == "/repos/acme/deployer/actions/workflows/deploy.yml/dispatches"
    assert dispatch.ref == "release/1.2"
    assert dispatch.inputs == {
        "service": "api",
        "replicas": 3,
        "dry_run": False,
        "port_context": '{"runId":"r_abc123","entity":{"id":"svc"}}',
        "tags": '["a","b"]',
    }
    assert dispatch.headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
    assert dispatch.headers["accept"] == "application/vnd.github+json"
    assert dispatch.headers["x-github-api-version"] == "2022-11-28"
    assert dispatch.headers["content-type"] == "application/json"


async def test_github_ref_precedence(client: Client, github: GitHubReceiver) -> None:
    await invoke(github_method(ref="hotfix"), context(client, github=github))
    await invoke(github_method(workflowInputs={"service": "api"}), context(client, github=github))
    await invoke(github_method(workflowInputs=None), context(client, github=github))
    assert [d.ref for d in github.dispatches] == ["hotfix", "main", "main"]
    assert "ref" not in github.dispatches[0].inputs
    assert github.dispatches[2].inputs == {}


async def test_github_link_for_github_com(
    client: Client, github: GitHubReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin(monkeypatch, "api.github.com")
    ctx = context(client, github=github)
    ctx.github_api_url = f"http://api.github.com:{github.port}/"
    outcome = await invoke(github_method(), ctx)
    assert outcome.state == "accepted"
    assert outcome.link == "https://github.com/acme/deployer/actions/workflows/deploy.yml"
    assert github.requests[0].headers["host"] == f"api.github.com:{github.port}"


async def test_github_bad_credentials_fail_without_the_token_in_the_message(
    client: Client, github: GitHubReceiver
) -> None:
    wrong = "ghp_WrongTokenValue9876543210"
    ctx = context(client, github=github, secrets={"GITHUB_TOKEN": wrong})
    outcome = await invoke(github_method(), ctx)
    assert outcome.state == "failure" and outcome.status_code == 401
    assert (
        outcome.message
        == "GitHub answered 401 for acme/deployer workflow deploy.yml: Bad credentials"
    )
    assert wrong not in outcome.message and GITHUB_TOKEN not in outcome.message
    assert github.dispatches == []


async def test_github_token_secret_name(client: Client, github: GitHubReceiver) -> None:
    ctx = context(client, github=github, secrets={"DEPLOY_BOT": GITHUB_TOKEN})
    outcome = await invoke(github_method(tokenSecret="DEPLOY_BOT"), ctx)
    assert outcome.state == "accepted"
    outcome = await invoke(github_method(), ctx)
    assert outcome == Outcome("failure", "secret GITHUB_TOKEN is not defined")
    outcome = await invoke(github_method(tokenSecret="NOPE"), ctx)
    assert outcome == Outcome("failure", "secret NOPE is not defined")
    assert len(github.requests) == 1


async def test_github_unknown_workflow_is_not_found(client: Client, github: GitHubReceiver) -> None:
    outcome = await invoke(github_method(workflow="missing.yml"), context(client, github=github))
    assert outcome.state == "failure" and outcome.status_code == 404
    assert outcome.message.endswith("workflow missing.yml: Not Found")


async def test_github_422_carries_githubs_message(client: Client, github: GitHubReceiver) -> None:
    outcome = await invoke(
        github_method(repo="strict", workflow="ci.yml"), context(client, github=github)
    )
    assert outcome.state == "failure" and outcome.status_code == 422
    assert (
        'Unexpected inputs provided: ["dry_run", "port_context", "replicas", "tags"]'
        in outcome.message
    )


async def test_github_more_than_25_inputs_fail_before_calling(
    client: Client, github: GitHubReceiver
) -> None:
    inputs: dict[str, Any] = {f"in{i}": i for i in range(26)}
    outcome = await invoke(github_method(workflowInputs=inputs), context(client, github=github))
    assert outcome.state == "failure"
    assert "at most 25 workflow inputs; this run has 26" in outcome.message
    assert github.requests == []
    # ref and nulls are not inputs
    inputs = {f"in{i}": i for i in range(25)} | {"ref": "main", "gone": None}
    outcome = await invoke(github_method(workflowInputs=inputs), context(client, github=github))
    assert outcome.state == "accepted"
    assert len(github.dispatches[0].inputs) == 25


async def test_github_rate_limit_is_retried(client: Client, github: GitHubReceiver) -> None:
    reset = int(time.time()) + 42
    github.fail_next(
        1,
        403,
        body={"message": "API rate limit exceeded for installation ID 1."},
        headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)},
    )
    outcome = await invoke(github_method(), context(client, github=github))
    assert outcome.state == "retry" and outcome.status_code == 403
    assert outcome.retry_after is not None and 35 < outcome.retry_after <= 42
    assert "rate limit" in outcome.message

    github.fail_next(1, 429, body={"message": "slow down"}, headers={"Retry-After": "11"})
    outcome = await invoke(github_method(), context(client, github=github))
    assert (outcome.state, outcome.retry_after) == ("retry", 11.0)

    github.fail_next(
        1,
        403,
        body={"message": "You have exceeded a secondary rate limit."},
        headers={"Retry-After": "60"},
    )
    outcome = await invoke(github_method(), context(client, github=github))
    assert (outcome.state, outcome.retry_after) == ("retry", 60.0)


async def test_github_other_403_is_a_failure(client: Client, github: GitHubReceiver) -> None:
    github.fail_next(1, 403, body={"message": "Resource not accessible by integration"})
    outcome = await invoke(github_method(), context(client, github=github))
    assert outcome.state == "failure"
    assert outcome.message.endswith("Resource not accessible by integration")


async def test_github_5xx_and_unreachable_are_retried(
    client: Client, github: GitHubReceiver
) -> None:
    github.fail_next(1, 502, body={"message": "Server Error"})
    outcome = await invoke(github_method(), context(client, github=github))
    assert (outcome.state, outcome.status_code) == ("retry", 502)
    ctx = context(client, github=github)
    ctx.github_api_url = f"http://127.0.0.1:{free_port()}"
    outcome = await invoke(github_method(), ctx)
    assert outcome.state == "retry"
    assert "connection refused" in outcome.message
    assert GITHUB_TOKEN not in outcome.message


async def test_github_needs_org_repo_and_workflow(client: Client) -> None:
    outcome = await invoke({"type": "GITHUB", "org": "acme"}, context(client))
    assert outcome == Outcome("failure", "the GITHUB invocation needs repo, workflow")


# ---------------------------------------------------------------------------------------
# GITLAB


def gitlab_method(**overrides: Any) -> dict[str, Any]:
    return {
        "type": "GITLAB",
        "groupName": "platform",
        "projectName": "deployer",
        "defaultRef": "release",
        "pipelineVariables": {
            "SERVICE": "api",
            "REPLICAS": 3,
            "DRY_RUN": True,
            "PORT_CONTEXT": {"runId": "r_abc123"},
            "EMPTY": None,
        },
        **overrides,
    }


async def test_gitlab_triggers_a_pipeline(client: Client, gitlab: GitLabReceiver) -> None:
    outcome = await invoke(gitlab_method(), context(client, gitlab=gitlab))
    assert outcome.state == "accepted" and outcome.status_code == 201
    (trigger,) = gitlab.triggers
    pipeline = trigger.pipeline
    assert outcome.link is not None and outcome.link == pipeline["web_url"]
    assert outcome.link.endswith(f"/platform/deployer/-/pipelines/{pipeline['id']}")
    assert outcome.external_run_id == str(pipeline["id"])
    assert outcome.message == (
        f"triggered GitLab pipeline {pipeline['id']} on platform/deployer at release"
    )
    assert trigger.ref == "release"
    assert trigger.variables == {
        "SERVICE": "api",
        "REPLICAS": "3",
        "DRY_RUN": "true",
        "PORT_CONTEXT": '{"runId":"r_abc123"}',
    }
    (request,) = gitlab.requests
    assert request.path == "/api/v4/projects/platform%2Fdeployer/trigger/pipeline"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = dict(parse_qsl(request.body.decode()))
    assert form["token"] == GITLAB_TOKEN and form["variables[SERVICE]"] == "api"


async def test_gitlab_ref_and_default_variables(client: Client, gitlab: GitLabReceiver) -> None:
    method = gitlab_method()
    del method["pipelineVariables"]
    inputs = {"ref": "main", "service": "api", "count": 2}
    outcome = await invoke(method, context(client, gitlab=gitlab, inputs=inputs))
    assert outcome.state == "accepted"
    assert gitlab.triggers[0].ref == "main"  # the run's ref input wins over defaultRef
    assert gitlab.triggers[0].variables == {"ref": "main", "service": "api", "count": "2"}

    method = gitlab_method(defaultRef=None, pipelineVariables={})
    assert (await invoke(method, context(client, gitlab=gitlab, inputs={}))).state == "accepted"
    assert gitlab.triggers[1].ref == "main" and gitlab.triggers[1].variables == {}


async def test_gitlab_unknown_ref_fails_with_gitlabs_message(
    client: Client, gitlab: GitLabReceiver
) -> None:
    outcome = await invoke(gitlab_method(defaultRef="nope"), context(client, gitlab=gitlab))
    assert outcome.state == "failure" and outcome.status_code == 400
    assert outcome.message == "GitLab answered 400 for platform/deployer: base: Reference not found"


async def test_gitlab_wrong_token_is_not_found_and_never_shown(
    client: Client, gitlab: GitLabReceiver
) -> None:
    wrong = "glptt-WrongTriggerToken55555"
    ctx = context(client, gitlab=gitlab, secrets={"GITLAB_TRIGGER_TOKEN": wrong})
    outcome = await invoke(gitlab_method(), ctx)
    assert outcome.state == "failure" and outcome.status_code == 404
    assert "404 Not Found" in outcome.message
    assert wrong not in outcome.message and GITLAB_TOKEN not in outcome.message
    outcome = await invoke(gitlab_method(projectName="other"), context(client, gitlab=gitlab))
    assert outcome.state == "failure" and outcome.status_code == 404


async def test_gitlab_missing_token_secret(client: Client, gitlab: GitLabReceiver) -> None:
    ctx = context(client, gitlab=gitlab, secrets={})
    assert await invoke(gitlab_method(), ctx) == Outcome(
        "failure", "secret GITLAB_TRIGGER_TOKEN is not defined"
    )
    ctx = context(client, gitlab=gitlab, secrets={"PIPELINES": GITLAB_TOKEN})
    assert (await invoke(gitlab_method(tokenSecret="PIPELINES"), ctx)).state == "accepted"
    assert len(gitlab.requests) == 1


@pytest.mark.parametrize(("status", "retry_after"), [(429, 30.0), (503, None), (500, None)])
async def test_gitlab_transient_answers_are_retried(
    client: Client, gitlab: GitLabReceiver, status: int, retry_after: float | None
) -> None:
    headers = {"Retry-After": "30"} if retry_after else {}
    gitlab.fail_next(1, status, body={"message": "busy"}, headers=headers)
    outcome = await invoke(gitlab_method(), context(client, gitlab=gitlab))
    assert (outcome.state, outcome.status_code, outcome.retry_after) == (
        "retry",
        status,
        retry_after,
    )


async def test_gitlab_timeout_is_retried(client: Client, gitlab: GitLabReceiver) -> None:
    gitlab.delay = 1.0
    outcome = await invoke(gitlab_method(), context(client, gitlab=gitlab, timeout=0.2))
    assert outcome == Outcome("retry", "the GitLab API timed out after 0.2 s")


async def test_gitlab_receiver_accepts_numeric_ids_and_json(gitlab: GitLabReceiver) -> None:
    project_id = gitlab.project_ids["platform/deployer"]
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{gitlab.api_url}/projects/{project_id}/trigger/pipeline",
            json={"token": GITLAB_TOKEN, "ref": "main", "variables": {"A": "1"}},
        )
        assert response.status_code == 201, response.text
        assert response.json()["project_id"] == project_id
        response = await http.post(
            f"{gitlab.url}/projects/platform%2Fdeployer/trigger/pipeline",
            data={"token": GITLAB_TOKEN},
        )
        assert response.status_code == 400
    assert gitlab.triggers[0].variables == {"A": "1"}
