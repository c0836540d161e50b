"""Identifier helpers: uuids, opaque client ids that carry their organization, secrets."""

from __future__ import annotations

import secrets
import string
import uuid

_ALPHABET = string.digits + string.ascii_letters  # base62
_UUID_CHARS = 22  # 62**22 > 2**128
_CLIENT_ID_RANDOM_CHARS = 10


def new_uuid() -> uuid.UUID:
    return uuid.uuid4()


def _b62encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def _b62decode(text: str) -> int:
    value = 0
    for char in text:
        index = _ALPHABET.find(char)
        if index < 0:
            raise ValueError("not base62")
        value = value * 62 + index
    return value


def new_client_id(org_id: uuid.UUID) -> str:
    """A 32-character client id whose first 22 characters encode the org.

    The org is recoverable from the id alone, so a token exchange can bind the tenant
    before it reads the credential row: no cross-tenant lookup table is needed.
    """
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(_CLIENT_ID_RANDOM_CHARS))
    return _b62encode(org_id.int, _UUID_CHARS) + suffix


def org_of_client_id(client_id: str) -> uuid.UUID | None:
    if len(client_id) != _UUID_CHARS + _CLIENT_ID_RANDOM_CHARS:
        return None
    try:
        value = _b62decode(client_id[:_UUID_CHARS])
    except ValueError:
        return None
    if value >= 1 << 128:
        return None
    return uuid.UUID(int=value)


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)
