"""Real HTTP servers on 127.0.0.1 for dispatch tests: a webhook receiver that verifies
signatures, and GitHub's and GitLab's pipeline-trigger APIs as they answer.

Each server runs `http.server.ThreadingHTTPServer` in a daemon thread on an ephemeral
port, so it answers while the test's event loop is busy; recording is thread-safe. Each
has `.url`, start/stop (or `with`), `requests` (every request, recorded on arrival;
`wait_requests`), and programmable answers: `fail_next(n, status)`, `fail_until(deadline,
status)` (a `time.monotonic()` deadline), and `delay` seconds before every answer.
HTTP/1.1 keep-alive is on, so connection reuse is observable (`Request.client_port`). An
`ssl_context` makes it an https server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import re
import ssl
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

from app.dispatch.signing import key_bytes, verify_port

TIMESTAMP_TOLERANCE_SECONDS = 300


@dataclass
class Request:
    """One request as it arrived."""

    method: str
    path: str  # without the query
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    client_port: int
    status: int = 0  # what was answered

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Answer:
    status: int
    body: Any = None  # JSON-encoded unless bytes or None
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Dropped connections and failed TLS handshakes are part of the tests."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
            client_port=self.client_address[1],
        )
        answer = self.server.receiver._answer(request)
        payload = answer.encoded()
        try:
            self.send_response(answer.status)
            headers = {"Content-Type": "application/json", **answer.headers}
            if answer.status in (204, 304):
                payload = b""
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


class Receiver:
    """The server machinery shared by the receivers; subclasses implement `handle`."""

    def __init__(self, *, delay: float = 0.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self._lock = threading.Lock()
        self._ssl = ssl_context
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._failures: deque[Answer] = deque()
        self._fail_until: tuple[float, Answer] | None = None
        self.delay = delay
        self.requests: list[Request] = []
        self.url = ""

    # lifecycle

    def start(self) -> Self:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.receiver = self
        if self._ssl is not None:
            server.socket = self._ssl.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        scheme = "https" if self._ssl is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    # programmable answers

    def fail_next(
        self,
        n: int,
        status: int = 503,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `n` requests with `status` (and body/headers)."""
        answer = Answer(status, body if body is not None else {"message": "failing"}, headers or {})
        with self._lock:
            self._failures.extend(answer for _ in range(n))

    def fail_until(
        self,
        deadline: float,
        status: int = 503,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer `status` to every request until `time.monotonic()` reaches `deadline`."""
        answer = Answer(status, body if body is not None else {"message": "failing"}, headers or {})
        with self._lock:
            self._fail_until = (deadline, answer)

    def _programmed(self) -> Answer | None:
        """The programmed failure for this request, if one is due (consumes it)."""
        with self._lock:
            if self._failures:
                return self._failures.popleft()
            if self._fail_until is not None and time.monotonic() < self._fail_until[0]:
                return self._fail_until[1]
        return None

    def _answer(self, request: Request) -> Answer:
        with self._lock:
            self.requests.append(request)
        if self.delay:
            time.sleep(self.delay)
        answer = self.handle(request)
        request.status = answer.status
        return answer

    def handle(self, request: Request) -> Answer:
        """The answer to one request; programmed failures come first by default."""
        return self._programmed() or self.serve(request)

    def serve(self, request: Request) -> Answer:
        raise NotImplementedError

    async def wait_requests(self, count: int, timeout: float = 10.0) -> list[Request]:  # noqa: ASYNC109
        """The requests once at least `count` have arrived (TimeoutError otherwise)."""
        return await _wait(self._lock, self.requests, count, timeout, "requests")


async def _wait(
    lock: threading.Lock, items: list[Any], count: int, seconds: float, what: str
) -> list[Any]:
    deadline = time.monotonic() + seconds
    while True:
        with lock:
            if len(items) >= count:
                return list(items)
            have = len(items)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{have} {what} after {seconds:g} s, not {count}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------
# Webhooks


@dataclass
class Delivery:
    run_id: str  # webhook-id
    body: Any
    raw: bytes
    headers: dict[str, str]
    method: str
    path: str
    status: int = 0  # what was answered


class WebhookReceiver(Receiver):
    """Any method and path. Verifies `X-Port-Signature` and the Standard Webhooks
    signature over the raw body (401 when either is wrong or old: `rejected`,
    `signature_failures`) and records each verified request in `deliveries`, whatever it
    was answered: a programmed failure, else `status` with `response` (see `respond`).
    `unique_run_ids()` are the runs delivered with a 2xx answer; `refused` counts the
    verified deliveries answered otherwise. `signing_secret` can be changed at any time."""

    def __init__(
        self,
        signing_secret: str,
        *,
        status: int = 200,
        response: Any = None,
        delay: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(delay=delay, ssl_context=ssl_context)
        self.signing_secret = signing_secret
        self.status = status
        self.response: Any = {"ok": True} if response is None else response
        self.response_headers: dict[str, str] = {}
        self.deliveries: list[Delivery] = []
        self.rejected: list[tuple[Request, str]] = []

    def respond(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        """The answer to every verified delivery from now on."""
        self.status, self.response, self.response_headers = status, body, headers or {}

    def _problem(self, request: Request) -> str | None:
        headers, body = request.headers, request.body
        timestamp = headers.get("x-port-timestamp", "")
        if not verify_port(
            self.signing_secret, timestamp, body, headers.get("x-port-signature", "")
        ):
            return "X-Port-Signature does not match"
        message_id = headers.get("webhook-id", "")
        stamp = headers.get("webhook-timestamp", "")
        if not message_id or not stamp.isdigit():
            return "webhook-id and webhook-timestamp are required"
        if abs(time.time() - int(stamp)) > TIMESTAMP_TOLERANCE_SECONDS:
            return "webhook-timestamp is too old"
        signed = f"{message_id}.{stamp}.".encode() + body
        digest = hmac.new(key_bytes(self.signing_secret), signed, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(digest).decode()
        offered = headers.get("webhook-signature", "").split()
        if not any(hmac.compare_digest(expected, sig) for sig in offered):
            return "webhook-signature does not match"
        return None

    def handle(self, request: Request) -> Answer:
        problem = self._problem(request)
        if problem is not None:
            with self._lock:
                self.rejected.append((request, problem))
            return Answer(401, {"error": problem})
        answer = self._programmed() or Answer(
            self.status, self.response, dict(self.response_headers)
        )
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError:
            body = request.body.decode("utf-8", "replace")
        delivery = Delivery(
            run_id=request.headers["webhook-id"],
            body=body,
            raw=request.body,
            headers=request.headers,
            method=request.method,
            path=request.path,
            status=answer.status,
        )
        with self._lock:
            self.deliveries.append(delivery)
        return answer

    @property
    def signature_failures(self) -> int:
        with self._lock:
            return len(self.rejected)

    @property
    def refused(self) -> int:
        """Verified deliveries answered with something other than 2xx."""
        with self._lock:
            return sum(1 for d in self.deliveries if not 200 <= d.status < 300)

    def unique_run_ids(self) -> set[str]:
        """The runs delivered with a 2xx answer, each once however often it arrived."""
        with self._lock:
            return {d.run_id for d in self.deliveries if 200 <= d.status < 300}

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:  # noqa: ASYNC109
        """The deliveries once there are at least `count` (TimeoutError otherwise)."""
        return await _wait(self._lock, self.deliveries, count, timeout, "deliveries")

    async def wait_unique(self, count: int, timeout: float = 10.0) -> set[str]:  # noqa: ASYNC109
        """`unique_run_ids()` once it holds at least `count` runs (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.unique_run_ids()
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(found)} runs delivered after {timeout:g} s, not {count}")
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------
# GitHub


GITHUB_DOCS = "https://docs.github.com/rest/actions/workflows#create-a-workflow-dispatch-event"
_DISPATCH = re.compile(r"^/repos/([^/]+)/([^/]+)/actions/workflows/([^/]+)/dispatches$")


@dataclass
class Dispatch:
    org: str
    repo: str
    workflow: str
    ref: str
    inputs: dict[str, Any]
    headers: dict[str, str]
    body: Any
    path: str


class GitHubReceiver(Receiver):
    """`POST /repos/{org}/{repo}/actions/workflows/{workflow}/dispatches` as GitHub
    answers it: 401 for a missing or unknown token, 404 for an unknown workflow, 422 for a
    bad body (more than 25 inputs, non-scalar values, inputs the workflow does not declare
    when `declared` lists them), else 204 and the dispatch is recorded."""

    MAX_INPUTS = 25

    def __init__(
        self,
        tokens: set[str],
        workflows: set[tuple[str, str, str]],
        *,
        declared: dict[tuple[str, str, str], set[str]] | None = None,
        delay: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(delay=delay, ssl_context=ssl_context)
        self.tokens = tokens
        self.workflows = workflows
        self.declared = declared or {}
        self.dispatches: list[Dispatch] = []

    @staticmethod
    def _error(status: int, message: str) -> Answer:
        return Answer(status, {"message": message, "documentation_url": GITHUB_DOCS})

    def serve(self, request: Request) -> Answer:
        match = _DISPATCH.match(request.path)
        if request.method != "POST" or match is None:
            return self._error(404, "Not Found")
        auth = request.headers.get("authorization", "")
        if not auth:
            return self._error(401, "Requires authentication")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() not in ("bearer", "token") or token.strip() not in self.tokens:
            return self._error(401, "Bad credentials")
        key = (unquote(match.group(1)), unquote(match.group(2)), unquote(match.group(3)))
        if key not in self.workflows:
            return self._error(404, "Not Found")
        try:
            body = json.loads(request.body)
        except ValueError:
            return self._error(400, "Problems parsing JSON")
        if not isinstance(body, dict):
            return self._error(400, "Body should be a JSON object")
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            return self._error(422, 'Invalid request.\n\n"ref" wasn\'t supplied.')
        inputs = body.get("inputs", {})
        if not isinstance(inputs, dict):
            return self._error(
                422,
                f"Invalid request.\n\nFor 'properties/inputs', {json.dumps(inputs)} is not an object.",
            )
        if len(inputs) > self.MAX_INPUTS:
            return self._error(
                422,
                f"you may only define up to {self.MAX_INPUTS} `inputs` for a "
                "`workflow_dispatch` event",
            )
        for name, value in inputs.items():
            if not isinstance(value, str | int | float | bool):
                return self._error(
                    422,
                    f"Invalid request.\n\nFor 'properties/{name}', {json.dumps(value)} is not a string.",
                )
        declared = self.declared.get(key)
        if declared is not None:
            unexpected = sorted(set(inputs) - declared)
            if unexpected:
                return self._error(422, f"Unexpected inputs provided: {json.dumps(unexpected)}")
        dispatch = Dispatch(*key, ref, inputs, request.headers, body, request.path)
        with self._lock:
            self.dispatches.append(dispatch)
        return Answer(204)


# ---------------------------------------------------------------------------------------
# GitLab


_TRIGGER = re.compile(r"^(?:/api/v4)?/projects/([^/]+)/trigger/pipeline$")
_VARIABLE = re.compile(r"^variables\[(.+)\]$")


@dataclass
class Trigger:
    project: str
    ref: str
    variables: dict[str, str]
    headers: dict[str, str]
    pipeline: dict[str, Any]  # what was answered


class GitLabReceiver(Receiver):
    """`POST /projects/{id}/trigger/pipeline` (an optional `/api/v4` prefix; `id` the
    URL-encoded project path or its number, see `project_ids`) as GitLab answers it: form
    or JSON body or query with `token`, `ref` and `variables`; 404 `{"message": "404 Not
    Found"}` for an unknown project or a wrong token, 400 "Reference not found" for a
    missing ref (or one outside `refs` when given), else 201 with the pipeline (recorded
    in `triggers`)."""

    def __init__(
        self,
        tokens: dict[str, str],
        *,
        refs: set[str] | None = None,
        delay: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(delay=delay, ssl_context=ssl_context)
        self.tokens = tokens
        self.refs = refs
        self.project_ids = {path: 100 + index for index, path in enumerate(tokens)}
        self.triggers: list[Trigger] = []
        self._ids = itertools.count(5000)

    @property
    def api_url(self) -> str:
        return self.url + "/api/v4"

    def _fields(self, request: Request) -> tuple[dict[str, str], dict[str, str]]:
        fields: dict[str, str] = dict(request.query)
        variables: dict[str, str] = {}
        content_type = request.headers.get("content-type", "")
        if "application/json" in content_type:
            body = json.loads(request.body or b"{}")
            for name in ("token", "ref"):
                if name in body:
                    fields[name] = str(body[name])
            raw = body.get("variables") or {}
            if isinstance(raw, list):
                raw = {item["key"]: item["value"] for item in raw}
            variables.update({str(k): str(v) for k, v in raw.items()})
        else:
            for name, value in parse_qsl(request.body.decode(), keep_blank_values=True):
                match = _VARIABLE.match(name)
                if match:
                    variables[match.group(1)] = value
                else:
                    fields[name] = value
        for name, value in request.query.items():
            match = _VARIABLE.match(name)
            if match:
                variables[match.group(1)] = value
        return fields, variables

    def serve(self, request: Request) -> Answer:
        not_found = Answer(404, {"message": "404 Not Found"})
        match = _TRIGGER.match(request.path)
        if request.method != "POST" or match is None:
            return not_found
        project_id = unquote(match.group(1))
        if project_id.isdigit():
            by_id = {number: path for path, number in self.project_ids.items()}
            project = by_id.get(int(project_id), "")
        else:
            project = project_id
        try:
            fields, variables = self._fields(request)
        except ValueError:
            return Answer(400, {"error": "The provided content-type is not supported."})
        expected = self.tokens.get(project)
        token = fields.get("token", "")
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            return not_found
        ref = fields.get("ref", "")
        if not ref or (self.refs is not None and ref not in self.refs):
            return Answer(400, {"message": {"base": ["Reference not found"]}})
        pipeline_id = next(self._ids)
        with self._lock:
            iid = 1 + sum(1 for t in self.triggers if t.project == project)
        answer = {
            "id": pipeline_id,
            "iid": iid,
            "project_id": self.project_ids[project],
            "sha": uuid.uuid4().hex + uuid.uuid4().hex[:8],
            "ref": ref,
            "status": "created",
            "source": "trigger",
            "web_url": f"{self.url}/{project}/-/pipelines/{pipeline_id}",
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        with self._lock:
            self.triggers.append(Trigger(project, ref, variables, request.headers, answer))
        return Answer(int(HTTPStatus.CREATED), answer)
