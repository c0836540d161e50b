"""Port's custom string formats, checked without the database."""

from __future__ import annotations

import pytest

from app.catalog.validators import FORMATS


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("https://git.example.com/org/repo", True),
        ("HTTP://EXAMPLE.COM", True),
        ("git+ssh://git@example.com/repo.git", True),
        ("mailto:team@example.com", True),
        ("urn:isbn:0451450523", True),
        ("http://", False),
        ("https//example.com", False),
        ("example.com/path", False),
        ("http:// example.com", False),
        ("", False),
    ],
)
def test_url_format(value: str, valid: bool) -> None:
    assert FORMATS["url"](value) is valid
