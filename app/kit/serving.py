"""The HTTP/1.1 connection as `portolan serve` runs it: uvicorn's httptools protocol with a
cap on a request's head and deadlines on the parts of a request the client sends.

Everything here happens before authentication, so it protects every tenant from anyone
who can open a connection:

- A request's head (request line and headers) may be at most `http_max_header_bytes`.
  Counted as the bytes arrive (an unfinished head stops being buffered once it passes the
  cap) and again when the head is complete (a large head that came in one read): 431
  `request_header_fields_too_large`, and the connection is closed.
- A request's head must be complete within `http_header_timeout_seconds` of its first byte,
  and the first request's within that of the connection being opened (a connection that
  never sends anything is closed too). Past it: 408 `request_timeout` when part of a head
  came, and the connection is closed.
- A request body still being sent may pause at most `http_body_idle_timeout_seconds`
  between two reads; past it the connection is closed (the endpoint sees the client gone).
  Time while Portolan itself stopped reading (the endpoint has not consumed what came) does
  not count.
- An idle keep-alive connection is closed after `http_keep_alive_seconds` (uvicorn's
  keep-alive timeout).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.config import Settings
from app.kit import fairloop
from app.kit.errors import error_body

# Bytes a head spends besides its URL and header names and values: the method and version
# around the URL, ": " and CRLF per header, the blank line.
_REQUEST_LINE_BYTES = 16
_HEADER_LINE_BYTES = 4


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with the head cap and the deadlines above. Made per settings by
    `protocol_for`, which sets the class attributes."""

    max_head_bytes: ClassVar[int] = 64 * 1024
    head_timeout: ClassVar[float] = 10.0
    body_idle_timeout: ClassVar[float] = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request's head
        self._head_bytes = 0  # bytes received for the current head (whole reads)
        self._head_size = 0  # the current head's size as parsed so far
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._arm_head_timer()
        elif self._body_timer is not None:
            self._arm_body_timer()
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse_head()

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head_size = _REQUEST_LINE_BYTES
        if self._head_timer is None:  # a request that began within an earlier read
            self._arm_head_timer()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + _HEADER_LINE_BYTES
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if self._head_size > self.max_head_bytes:
            self._refuse_head()
            return
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        self._arm_body_timer()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # The request's task counts for its client's address from its first step (in which
        # the middleware, the routing and often the token's verification run): begun in
        # the connection's context, that step was work of no org, which goes first.
        client = self.client[0] if self.client else "unknown"
        fairloop.caller_context(client).run(super()._start_asgi_task, cycle, app)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._cancel_body_timer()
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    # -- deadlines --------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes > 0 and self._idle():
            self._answer(
                408,
                "request_timeout",
                f"The request's headers did not arrive within {self.head_timeout:g} s",
            )
        self._close()

    def _arm_body_timer(self) -> None:
        self._cancel_body_timer()
        self._body_timer = self.loop.call_later(self.body_idle_timeout, self._body_timed_out)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            # Portolan stopped reading (the endpoint has not taken what came): the client
            # is not the one waiting.
            self._arm_body_timer()
            return
        self._close()

    # -- refusals ---------------------------------------------------------------------------

    def _refuse_head(self) -> None:
        if self.transport.is_closing():
            return
        if self._idle():
            self._answer(
                431,
                "request_header_fields_too_large",
                f"The request's headers are larger than {self.max_head_bytes} bytes",
            )
        self._close()

    def _idle(self) -> bool:
        """No response of an earlier request on this connection is under way (a pipelined
        one), so an answer may be written."""
        return self.cycle is None or self.cycle.response_complete

    def _answer(self, status: int, code: str, message: str) -> None:
        body = json.dumps(error_body(code, message)).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)

    def _close(self) -> None:
        self._refused = True
        self._cancel_head_timer()
        self._cancel_body_timer()
        self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedHttpProtocol]:
    """The connection protocol with the settings' cap and deadlines."""

    class PortolanHttpProtocol(GuardedHttpProtocol):
        max_head_bytes = settings.http_max_header_bytes
        head_timeout = settings.http_header_timeout_seconds
        body_idle_timeout = settings.http_body_idle_timeout_seconds

    return PortolanHttpProtocol


def loop_factory(settings: Settings) -> str:
    """uvicorn's `loop` setting for `event_loop` (app/kit/fairloop.py)."""
    return "app.kit.fairloop:new_loop" if settings.event_loop == "fair" else "uvloop"
