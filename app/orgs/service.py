"""Organizations: create one with its first credentials, read one, change its name and
Port's settings (audited)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.auth import service as auth_service
from app.db.database import Tx, bind_org
from app.kit.crypto import Cipher
from app.kit.errors import Invalid, NotFound
from app.kit.ids import new_uuid
from app.secrets.service import new_signing_secret

MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class CreatedOrg:
    org_id: uuid.UUID
    name: str
    client_id: str
    client_secret: str
    signing_secret: str

    def as_dict(self) -> dict[str, str]:
        return {
            "orgId": str(self.org_id),
            "name": self.name,
            "clientId": self.client_id,
            "clientSecret": self.client_secret,
            "signingSecret": self.signing_secret,
        }


@dataclass(frozen=True, slots=True)
class Org:
    id: uuid.UUID
    name: str
    created_at: datetime
    updated_at: datetime
    settings: dict[str, Any] = field(default_factory=dict)
    announcement: dict[str, Any] | None = None


def clean_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(ord(ch) < 32 for ch in name):
        raise Invalid(f"Organization name must be 1-{MAX_NAME} printable characters")
    return name


async def create_org(tx: Tx, *, name: str, cipher: Cipher) -> CreatedOrg:
    """Operator work on a system transaction: binds app.org_id to the new org so its rows
    pass the tenant policies' WITH CHECK whatever the login role is."""
    name = clean_name(name)
    org_id = new_uuid()
    await bind_org(tx, org_id)
    signing_secret = new_signing_secret()
    await tx.execute(
        "INSERT INTO organizations (id, name, signing_secret_encrypted) VALUES ($1, $2, $3)",
        org_id,
        name,
        cipher.encrypt(signing_secret),
    )
    cred = await auth_service.create_credential(
        tx, org_id=org_id, name="default", roles=[auth_service.ADMIN_ROLE]
    )
    return CreatedOrg(
        org_id=org_id,
        name=name,
        client_id=cred.client_id,
        client_secret=cred.client_secret,
        signing_secret=signing_secret,
    )


_SELECT = "SELECT id, name, created_at, updated_at, settings, announcement FROM organizations"


async def get_org(tx: Tx, org_id: uuid.UUID) -> Org:
    row = await tx.fetchrow(_SELECT + " WHERE id = $1", org_id)
    if row is None:
        raise NotFound("Organization was not found")
    return Org(**dict(row))


# Port's request keys that govern what a Portolan organization does not have: Port's
# onboarding wizard, and access by Port's support staff.
_NOT_SUPPORTED = {
    "/isOnboarded": "Port's onboarding state is not supported",
    "/toolSelectionProvisioning": "Port's onboarding state is not supported",
    "/settings/supportUserTTL": "Port's support-user access is not supported",
    "/settings/supportUserExpiresAt": "Port's support-user access is not supported",
}


def _refuse_unsupported(change: dict[str, Any]) -> None:
    settings = change.get("settings") or {}
    given = {f"/{k}": v for k, v in change.items()} | {
        f"/settings/{k}": v for k, v in settings.items()
    }
    problems = [
        {"pointer": pointer, "message": message}
        for pointer, message in _NOT_SUPPORTED.items()
        if given.get(pointer) is not None
    ]
    if settings.get("supportUserPermission") == "OPT_IN":
        problems.append(
            {
                "pointer": "/settings/supportUserPermission",
                "message": "Port's support-user access is not supported: only OPT_OUT",
            }
        )
    if problems:
        raise Invalid(
            "Not supported: " + "; ".join(f"{p['pointer']} ({p['message']})" for p in problems),
            code="not_supported",
            details=problems,
        )


def _present(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}


async def change_org(tx: Tx, org_id: uuid.UUID, change: dict[str, Any], *, replace: bool) -> Org:
    """PUT (`replace`: name, settings and announcement as given, absent ones cleared) or
    PATCH (each setting given replaces that setting, `null` removes it; an announcement
    given is merged into the current one, `null` removes it). `change`: the keys given.
    A change is recorded in the audit log (resource `organization`)."""
    _refuse_unsupported(change)
    row = await tx.fetchrow(_SELECT + " WHERE id = $1 FOR UPDATE", org_id)
    if row is None:
        raise NotFound("Organization was not found")
    if "name" in change and change["name"] is None:
        raise Invalid("name cannot be null", details=[{"pointer": "/name", "message": "null"}])
    name = clean_name(change["name"]) if "name" in change else row["name"]
    settings: dict[str, Any]
    announcement: dict[str, Any] | None
    if replace:
        settings = _present(change.get("settings") or {})
        given = change.get("announcement")
        announcement = _present(given) if given is not None else None
    else:
        settings = {**row["settings"], **(change.get("settings") or {})}
        settings = _present(settings)
        announcement = row["announcement"]
        if "announcement" in change:
            given = change["announcement"]
            announcement = None if given is None else _present({**(announcement or {}), **given})
    if announcement is not None and not announcement.get("content"):
        raise Invalid(
            "An announcement needs its content",
            details=[{"pointer": "/announcement/content", "message": "required"}],
        )
    before = {"name": row["name"], "settings": row["settings"], "announcement": row["announcement"]}
    after = {"name": name, "settings": settings, "announcement": announcement}
    if before != after:
        await tx.execute(
            "UPDATE organizations SET name = $2, settings = $3, announcement = $4, "
            "updated_at = now() WHERE id = $1",
            org_id,
            name,
            settings,
            announcement,
        )
        # Written here, not by a trigger (migration 0030 says why); who and from where
        # are the transaction's, as the triggers read them.
        await tx.execute(
            "INSERT INTO audit_log (org_id, actor, origin, resource, identifier, action, "
            "status, diff) VALUES ($1, "
            "coalesce(nullif(current_setting('portolan.actor', true), ''), 'system'), "
            "coalesce(nullif(current_setting('portolan.origin', true), ''), 'SYSTEM'), "
            "'organization', $2, 'UPDATE', 'SUCCESS', $3)",
            org_id,
            str(org_id),
            {"before": before, "after": after},
        )
    return await get_org(tx, org_id)


async def count_orgs(tx: Tx) -> int:
    return int(await tx.fetchval("SELECT count(*) FROM organizations"))
