"""Webhook signatures: Port's X-Port-Signature and Standard Webhooks' webhook-signature."""

from __future__ import annotations

import base64
import hashlib
import hmac

from app.dispatch.signing import headers, standard_signature, verify_port


def test_port_signature_is_base64_hmac_of_timestamp_dot_body() -> None:
    secret, body, ts = "s3cr3t", b'{"action":"deploy","run":{"id":"r_1"}}', 1764000000
    expected = base64.b64encode(
        hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    signed = headers(secret, "r_1", ts, body)
    assert signed["X-Port-Timestamp"] == str(ts)
    assert signed["X-Port-Signature"] == "v1," + expected
    assert verify_port(secret, str(ts), body, signed["X-Port-Signature"])
    assert not verify_port(secret, str(ts), body + b" ", signed["X-Port-Signature"])
    assert not verify_port("other", str(ts), body, signed["X-Port-Signature"])
    assert not verify_port(secret, str(ts + 1), body, signed["X-Port-Signature"])
    assert not verify_port(secret, "soon", body, signed["X-Port-Signature"])


def test_standard_webhooks_signature_matches_the_specifications_test_vector() -> None:
    # The example in the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signature = standard_signature(
        secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    signed = headers("plain-secret", "r_2", 1614265330, b"{}")
    assert signed["webhook-id"] == "r_2" and signed["webhook-timestamp"] == "1614265330"
    assert signed["webhook-signature"] == standard_signature(
        "plain-secret", "r_2", 1614265330, b"{}"
    )
