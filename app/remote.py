"""A client of Portolan's own API, for the command line (`portolan apply`, `export`,
`import backstage`): signs in with an org's machine credentials, refreshes its token when it
expires, and turns error answers into `ApiError` with Port's error code and message."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import httpx

_REFRESH_MARGIN_SECONDS = 30


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True, slots=True)
class Credentials:
    url: str
    client_id: str
    client_secret: str

    @classmethod
    def from_env(cls, url: str | None = None) -> Credentials:
        """PORTOLAN_URL (default http://127.0.0.1:8000), PORTOLAN_CLIENT_ID and
        PORTOLAN_CLIENT_SECRET."""
        client_id = os.environ.get("PORTOLAN_CLIENT_ID", "")
        client_secret = os.environ.get("PORTOLAN_CLIENT_SECRET", "")
        if not client_id or not client_secret:
            raise ValueError("set PORTOLAN_CLIENT_ID and PORTOLAN_CLIENT_SECRET")
        base = url or os.environ.get("PORTOLAN_URL") or "http://127.0.0.1:8000"
        return cls(url=base.rstrip("/"), client_id=client_id, client_secret=client_secret)


class Client:
    """Synchronous: the commands run one request after another, in order."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._credentials = credentials
        self._http = httpx.Client(
            base_url=credentials.url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": "portolan-cli"},
        )
        self._token: str | None = None
        self._expires_at = 0.0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sign_in(self) -> str:
        if self._token is None or time.monotonic() > self._expires_at:
            r = self._http.post(
                "/v1/auth/access_token",
                json={
                    "clientId": self._credentials.client_id,
                    "clientSecret": self._credentials.client_secret,
                },
            )
            body = _decode(r)
            self._token = str(body["accessToken"])
            ttl = float(body.get("expiresIn", 300))
            self._expires_at = time.monotonic() + max(ttl - _REFRESH_MARGIN_SECONDS, 1)
        return self._token

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> Any:
        """The answer's JSON body. Error statuses raise ApiError, except those in
        `ok_statuses` (their body is returned)."""
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {self._sign_in()}"}
            r = self._http.request(method, path, json=json, params=params, headers=headers)
            if r.status_code == 401 and attempt == 0:
                self._token = None  # revoked or expired early: sign in again, once
                continue
            if r.status_code in ok_statuses:
                return r.json()
            return _decode(r)
        raise AssertionError("unreachable")

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("PUT", path, json=json, **kw)

    def patch(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("PATCH", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)


def _decode(r: httpx.Response) -> Any:
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.is_success:
        return body
    if isinstance(body, dict):
        raise ApiError(
            r.status_code,
            str(body.get("error", "error")),
            str(body.get("message", r.reason_phrase)),
            body.get("details"),
        )
    raise ApiError(r.status_code, "error", r.text[:500] or r.reason_phrase)
