"""JSON responses built straight from plain data.

Routes whose data is already in the API's shape answer through `json_response` instead of
validating it into a response model and dumping it again; the route's `response_model`
still documents the shape. Dates come out as pydantic writes them (ISO 8601, `Z` for UTC),
so every route formats them alike.
"""

from __future__ import annotations

from typing import Any

import pydantic_core
from starlette.responses import Response


def to_json(content: Any) -> bytes:
    return pydantic_core.to_json(content)


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(to_json(content), status_code=status_code, media_type="application/json")
