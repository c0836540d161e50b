"""Typed domain errors. Each carries its HTTP status and Port's error code."""

from __future__ import annotations

from typing import Any


class PortolanError(Exception):
    """Base of every error that leaves the API as `{"ok": false, "error", "message"}`."""

    status_code: int = 400
    code: str = "bad_request"
    # Seconds the client should wait before trying again (sent as Retry-After), if any.
    retry_after: int | None = None

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"ok": False, "error": code, "message": message}
    if details is not None:
        body["details"] = details
    return body


class BadRequest(PortolanError):
    status_code = 400
    code = "bad_request"


class Unauthorized(PortolanError):
    status_code = 401
    code = "unauthorized"


class Forbidden(PortolanError):
    status_code = 403
    code = "forbidden"


class NotFound(PortolanError):
    status_code = 404
    code = "not_found"


class Conflict(PortolanError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(PortolanError):
    status_code = 413
    code = "payload_too_large"


class Invalid(PortolanError):
    status_code = 422
    code = "invalid_request"


class Unavailable(PortolanError):
    """The service cannot answer now (database connections, collisions with concurrent
    writers); answered with Retry-After."""

    status_code = 503
    code = "unavailable"
    retry_after = 1
