"""Organizations: create one with its first credentials, read one."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

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


async def get_org(tx: Tx, org_id: uuid.UUID) -> Org:
    row = await tx.fetchrow(
        "SELECT id, name, created_at, updated_at FROM organizations WHERE id = $1", org_id
    )
    if row is None:
        raise NotFound("Organization was not found")
    return Org(**dict(row))


async def count_orgs(tx: Tx) -> int:
    return int(await tx.fetchval("SELECT count(*) FROM organizations"))
