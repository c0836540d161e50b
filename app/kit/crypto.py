"""Values encrypted at rest (organization secrets, signing secrets): Fernet (AES-128-CBC +
HMAC-SHA256) keyed by PORTOLAN_ENCRYPTION_KEY."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken

from app.config import Settings


class Cipher:
    def __init__(self, key: str) -> None:
        self._fernet = Fernet(key.encode())

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            # Not a value of this key: PORTOLAN_ENCRYPTION_KEY changed since it was stored.
            raise RuntimeError("a stored secret cannot be decrypted with this key") from exc


def cipher_for(settings: Settings) -> Cipher:
    return Cipher(settings.encryption_key.get_secret_value())
