"""Settings: plain URLs, comma-separated origins, and production refusing default secrets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import DEV_ENCRYPTION_KEY, DEV_SECRET_KEY, Settings

PROD_OK = {
    "env": "production",
    "database_url": "postgresql://portolan@db:5432/portolan",
    "redis_url": "redis://redis:6379/0",
    "secret_key": "k" * 48,
    "encryption_key": "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg=",
    "platform_token": "p" * 40,
}


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_production_with_real_secrets_starts() -> None:
    assert _settings(**PROD_OK).env == "production"


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("secret_key", DEV_SECRET_KEY, "PORTOLAN_SECRET_KEY"),
        ("secret_key", "", "PORTOLAN_SECRET_KEY"),
        ("secret_key", "short", "at least 32"),
        ("encryption_key", DEV_ENCRYPTION_KEY, "PORTOLAN_ENCRYPTION_KEY"),
        ("database_url", None, "PORTOLAN_DATABASE_URL"),
        ("redis_url", None, "PORTOLAN_REDIS_URL"),
    ],
)
def test_production_refuses_missing_or_default_secrets(
    field: str, value: object, phrase: str
) -> None:
    with pytest.raises(ValidationError, match=phrase):
        _settings(**{**PROD_OK, field: value})


def test_production_refuses_the_dev_platform_token() -> None:
    from app.config import DEV_PLATFORM_TOKEN

    with pytest.raises(ValidationError, match="PORTOLAN_PLATFORM_TOKEN"):
        _settings(**{**PROD_OK, "platform_token": DEV_PLATFORM_TOKEN})


def test_development_accepts_defaults() -> None:
    assert _settings().env == "development"


def test_database_url_must_be_plain_postgresql() -> None:
    with pytest.raises(ValidationError, match="postgresql://"):
        _settings(database_url="mysql://x@y/z")


def test_sqlalchemy_url_uses_asyncpg() -> None:
    s = _settings(database_url="postgresql://u@h:5432/d")
    assert s.sqlalchemy_url == "postgresql+asyncpg://u@h:5432/d"


def test_cors_origins_read_from_a_comma_separated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTOLAN_CORS_ORIGINS", "https://a.example, https://b.example")
    assert _settings().cors_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize("origin", ["*", "https://*.example", "a.example", "null"])
def test_cors_origins_are_named_one_by_one(monkeypatch: pytest.MonkeyPatch, origin: str) -> None:
    monkeypatch.setenv("PORTOLAN_CORS_ORIGINS", origin)
    with pytest.raises(ValidationError, match="not an http"):
        _settings()


def test_secrets_are_not_in_the_settings_repr() -> None:
    s = _settings(**PROD_OK)
    assert "k" * 48 not in repr(s) and "p" * 40 not in repr(s)


def test_encryption_key_must_be_a_fernet_key() -> None:
    with pytest.raises(ValidationError, match="Fernet"):
        _settings(encryption_key="not-a-key")
