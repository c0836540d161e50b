"""Shared OpenAPI fragments: Port's error body, declared on every route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ok: bool = False
    error: str
    message: str
    details: Any | None = None


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_COMMON: dict[int | str, dict[str, Any]] = {
    400: _err("Malformed request (e.g. body is not JSON)"),
    413: _err("Request body is too large"),
    422: _err("The request does not match the route's schema"),
    503: _err(
        "The database cannot take the request now (no connection free or accepted, or the "
        "change kept colliding with concurrent changes): try again after Retry-After"
    ),
}
ERRORS_PUBLIC: dict[int | str, dict[str, Any]] = {**_COMMON, 401: _err("Not authenticated")}
ERRORS_AUTHED: dict[int | str, dict[str, Any]] = {
    **ERRORS_PUBLIC,
    403: _err("Not allowed"),
    404: _err("A resource with the provided identifier was not found"),
    429: _err("The organization's rate limit for this kind of request is reached (Retry-After)"),
}


def conflict(description: str) -> dict[int | str, dict[str, Any]]:
    """A route's 409 (an identifier that exists, data in the way)."""
    return {409: _err(description)}


class OkResponse(BaseModel):
    """`{"ok": true}`: what a delete answers."""

    ok: Literal[True] = True
