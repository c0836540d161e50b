"""Organizations: create one with its first credentials, read one."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import service as auth_service
from app.db.engine import bind_org_setting
from app.kit.errors import Invalid, NotFound
from app.kit.ids import new_uuid
from app.orgs.models import Organization

MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class CreatedOrg:
    org_id: uuid.UUID
    name: str
    client_id: str
    client_secret: str

    def as_dict(self) -> dict[str, str]:
        return {
            "orgId": str(self.org_id),
            "name": self.name,
            "clientId": self.client_id,
            "clientSecret": self.client_secret,
        }


def clean_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(ord(ch) < 32 for ch in name):
        raise Invalid(f"Organization name must be 1-{MAX_NAME} printable characters")
    return name


async def create_org(session: AsyncSession, *, name: str) -> CreatedOrg:
    """Operator work on a system session: binds app.org_id to the new org so the rows
    pass the tenant policies' WITH CHECK whatever the login role is."""
    name = clean_name(name)
    org_id = new_uuid()
    await bind_org_setting(session, org_id)
    session.add(Organization(id=org_id, name=name))
    await session.flush()
    cred = await auth_service.create_credential(
        session, org_id=org_id, name="default", roles=[auth_service.ADMIN_ROLE]
    )
    return CreatedOrg(
        org_id=org_id, name=name, client_id=cred.client_id, client_secret=cred.client_secret
    )


async def get_org(session: AsyncSession, org_id: uuid.UUID) -> Organization:
    org = await session.get(Organization, org_id)
    if org is None:
        raise NotFound("Organization was not found")
    return org


async def count_orgs(session: AsyncSession) -> int:
    return int((await session.execute(select(func.count()).select_from(Organization))).scalar_one())
