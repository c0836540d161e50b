"""The one outbound HTTP client (webhooks, GitHub, GitLab, identity providers' key sets).

Every call passes the guard first (`outbound.check`, which raises `outbound.Refused`) and
then connects to the address the guard checked, never to a second lookup's answer: the
request goes to that address with the URL's own `Host` header, and for https the URL's
host name is the TLS server name, so the certificate is verified against the name.
Redirects are not followed, no proxy or netrc from the environment is used, and the call
as a whole (connect, send, read) is bounded by its timeout. A response body is read up to
a limit (the rest is dropped).

Connections are kept per (scheme, host, port, address) - a connection verified for one
name is never reused for another name served at the same address - in a bounded set of
pools; idle pools are closed when the set is full.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections import OrderedDict
from types import TracebackType

import certifi
import httpx

from app.kit import outbound

READ_LIMIT_BYTES = 1024 * 1024
_DROPPED_REQUEST_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
)
_DROPPED_RESPONSE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})

_PoolKey = tuple[str, str, int, str]


class _Pool:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.in_flight = 0


class Client:
    """Outbound HTTP with the guard and address pinning; reuses connections per host."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | None = None,
        max_hosts: int = 64,
        max_connections_per_host: int = 20,
        read_limit: int = READ_LIMIT_BYTES,
    ) -> None:
        self._ssl = (
            verify if verify is not None else ssl.create_default_context(cafile=certifi.where())
        )
        self._max_hosts = max_hosts
        self._limits = httpx.Limits(
            max_connections=max_connections_per_host,
            max_keepalive_connections=max_connections_per_host,
            keepalive_expiry=30.0,
        )
        self._read_limit = read_limit
        self._pools: OrderedDict[_PoolKey, _Pool] = OrderedDict()
        self._closed = False

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.client.aclose()

    def _new_client(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(
            verify=self._ssl, trust_env=False, limits=self._limits, retries=0
        )
        return httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False)

    async def _pool(self, key: _PoolKey) -> _Pool:
        pool = self._pools.get(key)
        if pool is not None:
            self._pools.move_to_end(key)
            return pool
        pool = self._pools[key] = _Pool(self._new_client())
        if len(self._pools) > self._max_hosts:
            idle = [k for k, p in self._pools.items() if p.in_flight == 0 and k != key]
            for old in idle[: len(self._pools) - self._max_hosts]:
                await self._pools.pop(old).client.aclose()
        return pool

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        allowed: outbound.Allowed,
        timeout: float,  # noqa: ASYNC109 - bounds the whole call, see below
    ) -> httpx.Response:
        """One request to a checked URL. Raises outbound.Refused, httpx.InvalidURL, or an
        httpx.HTTPError (httpx.TimeoutException when the timeout runs out)."""
        if self._closed:
            raise RuntimeError("the outbound client is closed")
        target = await outbound.check(url, allowed)
        parsed = httpx.URL(url)
        if (
            parsed.host.lower().rstrip(".") != target.host
            or (parsed.port or (443 if parsed.scheme == "https" else 80)) != target.port
        ):
            raise outbound.Refused("the URL's host is ambiguous")
        name = parsed.raw_host.decode("ascii").rstrip(".")
        pinned = parsed.copy_with(host=str(target.address))
        sent = {
            key: value
            for key, value in (headers or {}).items()
            if key.lower() not in _DROPPED_REQUEST_HEADERS
        }
        sent["Host"] = parsed.netloc.decode("ascii")
        extensions = {"sni_hostname": name} if target.scheme == "https" else {}
        key = (target.scheme, name.lower(), target.port, str(target.address))
        pool = await self._pool(key)
        request = pool.client.build_request(
            method,
            pinned,
            headers=sent,
            content=content,
            timeout=httpx.Timeout(timeout),
            extensions=extensions,
        )
        pool.in_flight += 1
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(pool.client, request)
        except TimeoutError as exc:
            raise httpx.TimeoutException(
                f"no complete answer within {timeout:g} s", request=request
            ) from exc
        finally:
            pool.in_flight -= 1

    async def _exchange(self, client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        response = await client.send(request, stream=True)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > self._read_limit:
                    break
        finally:
            await response.aclose()
        return httpx.Response(
            response.status_code,
            headers=[
                (name, value)
                for name, value in response.headers.multi_items()
                if name.lower() not in _DROPPED_RESPONSE_HEADERS
            ],
            content=b"".join(chunks)[: self._read_limit],
            request=request,
            extensions={
                key: value
                for key, value in response.extensions.items()
                if key in ("http_version", "reason_phrase")
            },
        )


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Client] = weakref.WeakKeyDictionary()


def shared() -> Client:
    """The running event loop's client (connections are bound to a loop)."""
    loop = asyncio.get_running_loop()
    client = _shared.get(loop)
    if client is None or client._closed:
        client = _shared[loop] = Client()
    return client


async def aclose_shared() -> None:
    """Close the running loop's shared client, if it has one."""
    client = _shared.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


async def send(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    allowed: outbound.Allowed,
    timeout: float,  # noqa: ASYNC109 - passed on to Client.send
) -> httpx.Response:
    """`Client.send` on the running loop's shared client."""
    return await shared().send(
        method, url, headers=headers, content=content, allowed=allowed, timeout=timeout
    )
