"""What an integration receives when it claims a run of an INTEGRATION_ACTION: the
invocation with its `integrationActionExecutionProperties` rendered over the run's
trigger data (Port's payload: `{type, installationId, integrationActionType,
integrationActionExecutionProperties}`).

Portolan sends nothing for these runs: the integration asks for them (app/actions/claims.py),
so there is no outbound request for a secret to go into. Their templates see no secrets
(`.secrets` is `{}`, and definitions that name one are refused): what they render is the
run's `payload`, handed to the integration and shown to the run's readers alike. The
integration holds the credentials of the tool it drives in its own configuration.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.dispatch import templates
from app.dispatch.runner import run_entities, trigger_data
from app.search.calc import calculate


class Unrenderable(Exception):
    """The run's invocation cannot be rendered (a template's jq failed, or it names a
    secret): the run ends in FAILURE with this message."""


async def render_payload(
    run: asyncpg.Record, calculated: dict[str, dict[str, Any]], *, org: object
) -> dict[str, Any]:
    """The payload of a run (Unrenderable when it cannot have one). `calculated`: the
    definitions of its entities' blueprints that have calculation properties, evaluated
    now as at any dispatch. Raises sandbox.Busy when the org gets no jq turn in time."""
    for blueprint, definition in calculated.items():
        found = [e for e in run_entities(run["context"]) if e.get("blueprint") == blueprint]
        await calculate(definition, found, org=org)
        for entity in found:
            entity.pop("calculationErrors", None)
    method: dict[str, Any] = run["definition"]["invocationMethod"]
    properties = method.get("integrationActionExecutionProperties") or {}
    named = templates.referenced_secrets(properties)
    if named:
        raise Unrenderable(
            f"secret {sorted(named)[0]} cannot be used by an INTEGRATION_ACTION: its payload "
            "is handed to the integration and shown on the run"
        )
    try:
        rendered = await templates.render(
            properties,
            trigger_data(run, {}),
            "/integrationActionExecutionProperties",
            org=org,
        )
    except templates.TemplateError as exc:
        raise Unrenderable(f"the invocation's template failed: {exc}") from exc
    if not isinstance(rendered, dict):
        raise Unrenderable("integrationActionExecutionProperties did not render to an object")
    return {
        "type": "INTEGRATION_ACTION",
        "installationId": method["installationId"],
        "integrationActionType": method["integrationActionType"],
        "integrationActionExecutionProperties": rendered,
    }
