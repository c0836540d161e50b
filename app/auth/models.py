"""Machine credentials: a client id and the hash of its secret, per organization."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    DateTime,
    ForeignKeyConstraint,
    Index,
    LargeBinary,
    String,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, timestamp


class Credential(Base):
    __tablename__ = "credentials"
    __table_args__ = (ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),)

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    roles: Mapped[list[str]] = mapped_column(ARRAY(String(120)), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # Tokens issued before this (whole seconds) are refused: set when the secret rotates.
    tokens_valid_after: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("date_trunc('second', now())")
    )
    # A disabled credential's tokens are refused, and it gets no new ones (Port's `enabled`).
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    updated_at: Mapped[datetime] = timestamp()


class BlueprintPermissions(Base):
    """Who may register, update and unregister a blueprint's entities. No row: defaults."""

    __tablename__ = "blueprint_permissions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "blueprint"],
            ["blueprints.org_id", "blueprints.identifier"],
            ondelete="CASCADE",
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    permissions: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    updated_at: Mapped[datetime] = timestamp()


class ActionPermissions(Base):
    """Who may execute and approve an action. No row: defaults."""

    __tablename__ = "action_permissions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "action"],
            ["actions.org_id", "actions.identifier"],
            ondelete="CASCADE",
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    action: Mapped[str] = mapped_column(String(100), primary_key=True)
    permissions: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    updated_at: Mapped[datetime] = timestamp()


class OidcConfig(Base):
    """An org's identity provider. Orgs may share an (issuer, audience); the index finds
    the orgs a token without X-Portolan-Org may belong to (app/auth/verifier.py)."""

    __tablename__ = "oidc_configs"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index("ix_oidc_configs_issuer_audience", "issuer", "audience"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    issuer: Mapped[str] = mapped_column(String(500), nullable=False)
    audience: Mapped[str] = mapped_column(String(500), nullable=False)
    jwks_uri: Mapped[str] = mapped_column(String(2000), nullable=False)
    email_claim: Mapped[str] = mapped_column(String(100), nullable=False)
    name_claim: Mapped[str] = mapped_column(String(100), nullable=False)
    groups_claim: Mapped[str | None] = mapped_column(String(100))
    group_teams: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    group_roles: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    updated_at: Mapped[datetime] = timestamp()
