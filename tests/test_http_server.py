"""The HTTP server before authentication, against a real `portolan serve` over raw sockets:
a request head over the cap is refused (431), heads that do not arrive in time and bodies
that stop are closed, and ordinary requests (keep-alive, large but allowed headers, slow
but steady bodies) still work."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.config import Settings
from tests.conftest import served

ROOT = Path(__file__).resolve().parent.parent
MAX_HEAD = 8 * 1024
HEAD_TIMEOUT = 1.0
BODY_IDLE = 1.0
KEEP_ALIVE = 4


@dataclass
class Server:
    port: int
    log: Path

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.settimeout(10)
        return sock


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[Server]:
    with served(
        settings,
        PORTOLAN_DB_POOL_SIZE="2",
        PORTOLAN_HTTP_MAX_HEADER_BYTES=str(MAX_HEAD),
        PORTOLAN_HTTP_HEADER_TIMEOUT_SECONDS=str(HEAD_TIMEOUT),
        PORTOLAN_HTTP_BODY_IDLE_TIMEOUT_SECONDS=str(BODY_IDLE),
        PORTOLAN_HTTP_KEEP_ALIVE_SECONDS=str(KEEP_ALIVE),
    ) as (port, log):
        yield Server(port=port, log=log)


def _request(path: str = "/healthz", extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: portolan.test\r\n{extra}\r\n".encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body by Content-Length) from the socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed the connection within `seconds` (and what it sent)."""
    sock.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def test_a_head_over_the_cap_is_431_in_ports_shape(server: Server) -> None:
    # A head that arrives whole: refused once parsed.
    with server.connect() as sock:
        sock.sendall(_request(extra=f"X-Big: {'a' * (MAX_HEAD + 100)}\r\n"))
        status, headers, body = _read_response(sock)
        assert status == 431, body
        assert headers["connection"] == "close"
        assert json.loads(body) == {
            "ok": False,
            "error": "request_header_fields_too_large",
            "message": f"The request's headers are larger than {MAX_HEAD} bytes",
        }
        assert _closed_within(sock, 5)[0]
    # Many headers that add up past the cap.
    with server.connect() as sock:
        many = "".join(f"X-H{i}: {'b' * 100}\r\n" for i in range(MAX_HEAD // 100))
        sock.sendall(_request(extra=many))
        assert _read_response(sock)[0] == 431


def test_a_head_that_keeps_growing_is_cut_off_not_buffered(server: Server) -> None:
    # 20 MiB of one header, sent as it is made: the server refuses it long before the end
    # (before, it buffered it all and answered 200).
    chunk = b"a" * 65536
    sent = 0
    refused = False
    answer = b""
    with server.connect() as sock:
        sock.sendall(_request().removesuffix(b"\r\n") + b"X-Big: ")
        try:
            while sent < 20 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            refused = True
        if not refused:
            try:
                sock.sendall(b"\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                refused = True
        closed, answer = _closed_within(sock, 10)
    # Refused part-way (the server closed: the rest could not be sent), or told 431.
    assert not answer.startswith(b"HTTP/1.1 200"), (sent, answer[:200])
    assert refused or (closed and answer.startswith(b"HTTP/1.1 431")), (sent, answer[:200])


def test_unfinished_heads_are_closed_after_the_deadline(server: Server) -> None:
    socks = [server.connect() for _ in range(300)]
    try:
        started = time.monotonic()
        for i, sock in enumerate(socks):
            if i % 4 == 0:
                continue  # says nothing at all
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: portolan.test\r\nX-Slow: ")
        # Slowloris: a byte now and then keeps nothing open past the deadline.
        dribbler = server.connect()
        socks.append(dribbler)
        dribbler.sendall(b"GET /healthz HTTP/1.1\r\n")
        dribble_closed = False
        while time.monotonic() - started < HEAD_TIMEOUT + 2:
            try:
                dribbler.sendall(b"X-A: b\r\n")
            except (BrokenPipeError, ConnectionResetError):
                dribble_closed = True
                break
            time.sleep(0.2)
        results = [_closed_within(sock, HEAD_TIMEOUT + 3) for sock in socks]
        elapsed = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    still_open = [i for i, (closed, _) in enumerate(results) if not closed]
    assert still_open == [], f"{len(still_open)} of {len(socks)} unfinished requests still open"
    assert dribble_closed or results[-1][0]
    assert elapsed < HEAD_TIMEOUT + 8
    # Those that sent part of a head were told why.
    told = [received for closed, received in results if received]
    assert told, "no connection got an answer"
    for received in told:
        assert received.startswith(b"HTTP/1.1 408"), received[:200]
        assert b'"error": "request_timeout"' in received


def test_a_body_that_stops_is_closed_and_a_slow_steady_body_is_not(server: Server) -> None:
    body = json.dumps({"clientId": "x" * 32, "clientSecret": "y" * 40}).encode()
    head = _request(
        "/v1/auth/access_token",
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n",
        method="POST",
    )
    with server.connect() as sock:
        sock.sendall(head + body[:10])
        closed, received = _closed_within(sock, BODY_IDLE + 4)
        assert closed, "a body that stopped half-way kept its connection open"
        assert not received.startswith(b"HTTP/1.1 2")
    # A byte every 0.2 s for longer than the idle limit: slow, never idle, answered.
    with server.connect() as sock:
        sock.sendall(head)
        for i in range(0, len(body), 4):
            sock.sendall(body[i : i + 4])
            time.sleep(0.2)
        status, _, answer = _read_response(sock)
        assert status == 401, answer  # made-up credentials, refused by the endpoint


def test_ordinary_requests_still_work(server: Server) -> None:
    with server.connect() as sock:
        # A large head under the cap.
        sock.sendall(_request(extra=f"X-Token: {'t' * (MAX_HEAD - 1024)}\r\n"))
        status, _, body = _read_response(sock)
        assert status == 200, body
        # Keep-alive: idle longer than the head deadline (the deadline runs from a
        # request's first byte, not from the previous answer), then the next request.
        time.sleep(HEAD_TIMEOUT + 0.5)
        sock.sendall(_request("/readyz"))
        assert _read_response(sock)[0] == 200
        # A head that arrives in pieces within the deadline.
        for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: portolan.test\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(0.2)
        assert _read_response(sock)[0] == 200
        # Two requests in one write (pipelined).
        sock.sendall(_request() + _request("/readyz"))
        assert _read_response(sock)[0] == 200
        assert _read_response(sock)[0] == 200
    # An upgrade offer (curl --http2 on http://) is answered over HTTP/1.1.
    with server.connect() as sock:
        offer = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        sock.sendall(_request(extra=offer))
        assert _read_response(sock)[0] == 200
    # An idle keep-alive connection is closed once the keep-alive time has passed.
    with server.connect() as sock:
        sock.sendall(_request())
        assert _read_response(sock)[0] == 200
        assert _closed_within(sock, KEEP_ALIVE + 3)[0]
