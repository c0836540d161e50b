"""Signatures on outbound webhooks: Port's and Standard Webhooks', over the exact bytes sent.

- Port: `X-Port-Timestamp: <unix seconds>` and `X-Port-Signature: v1,<base64 HMAC-SHA256 of
  "{timestamp}.{body}">`, keyed by the organization's signing secret.
- Standard Webhooks: `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64
  HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed by the same secret's bytes (a receiver
  configured with `whsec_` + base64 of them verifies it with any Standard Webhooks library).

Receivers compare against the raw body, in constant time, and reject old timestamps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def key_bytes(secret: str) -> bytes:
    """The HMAC key of a secret: a `whsec_` secret is base64 behind its prefix (Standard
    Webhooks' serialisation), any other is its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def _sign(key: bytes, message: bytes) -> str:
    return "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def port_signature(secret: str, timestamp: int, body: bytes) -> str:
    return _sign(key_bytes(secret), f"{timestamp}.".encode() + body)


def standard_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    return _sign(key_bytes(secret), f"{message_id}.{timestamp}.".encode() + body)


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every signature header for one delivery of `body`."""
    return {
        "X-Port-Timestamp": str(timestamp),
        "X-Port-Signature": port_signature(secret, timestamp, body),
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(secret, message_id, timestamp, body),
    }


def verify_port(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """A receiver's check of X-Port-Signature (constant time)."""
    if not timestamp.isdigit():
        return False
    expected = port_signature(secret, int(timestamp), body)
    return hmac.compare_digest(expected.encode(), signature.encode())
