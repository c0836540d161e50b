"""Port's `version` query parameter on the action and run routes: Port answers its `v1` or
`v2` shapes; Portolan answers `v2`'s only, so `v2` is taken and `v1` refused (never
answered in shapes the client did not ask for)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Query

from app.kit.errors import Invalid

ApiVersion = Annotated[
    Literal["v1", "v2"] | None,
    Query(description="Port's shapes: `v2` (what Portolan answers); `v1` is not supported (422)"),
]


def check(version: str | None) -> None:
    if version == "v1":
        raise Invalid(
            "version=v1 is not supported: Portolan answers Port's v2 shapes (send v2 or "
            "leave version out)",
            code="not_supported",
            details=[{"parameter": "version", "message": "only v2"}],
        )
