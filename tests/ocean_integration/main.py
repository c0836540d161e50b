"""A small Ocean integration the suite runs against a live Portolan: departments and the
people in them. `OCEAN__INTEGRATION__CONFIG__PERSON_COUNT` says how many people there are."""

from __future__ import annotations

from typing import Any

from port_ocean.context.ocean import ocean

DEPARTMENTS = ("engineering", "finance", "legal")


def _count() -> int:
    return int(ocean.integration_config.get("person_count") or 0)


@ocean.on_resync("department")
async def resync_departments(kind: str) -> list[dict[str, Any]]:
    return [
        {"id": name, "name": name.title(), "budget": 1000 * (i + 1)}
        for i, name in enumerate(DEPARTMENTS)
    ]


@ocean.on_resync("person")
async def resync_people(kind: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"person-{i}",
            "name": f"Person {i}",
            "age": 20 + i,
            "department": DEPARTMENTS[i % len(DEPARTMENTS)],
            "badge": f"B{i:04d}",
        }
        for i in range(_count())
    ]
