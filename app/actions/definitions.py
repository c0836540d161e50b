"""Action definitions in Port's shape (`port-api-notes.md` §2.5): checked and normalised.

`{identifier, title?, icon?, description?, trigger, invocationMethod, requiredApproval?,
  approvalNotification?, publish?, allowAnyoneToViewRuns?}`

A definition that could not run is a 422 naming each problem by JSON pointer: unknown
blueprints, inputs of unknown types or formats, `entity` inputs without an existing
blueprint, `required` / `order` naming undeclared inputs, a self-service `condition` that
does not compile against the blueprint (search language), jq in `{{ }}` templates or
automation conditions that does not compile, and invocation methods Portolan does not run
(`AZURE_DEVOPS`, `KAFKA`, on-premise agents).

`INTEGRATION_ACTION` runs are claimed and run by an integration (Port's Ocean): its
`integrationActionExecutionProperties` templates see no secrets (the run's payload is what
the integration and the run's readers receive; the integration holds its own credentials).
"""

from __future__ import annotations

import re
from typing import Any

from app.catalog.validation import Problems, check_jq, check_pattern, valid_action_identifier
from app.dispatch import templates
from app.kit.errors import Invalid
from app.search.compiler import Compiler
from app.search.sql import Scope

OPERATIONS = ("CREATE", "DAY-2", "DELETE")
INPUT_TYPES = ("string", "number", "boolean", "object", "array")
INPUT_FORMATS = (
    "date-time",
    "url",
    "email",
    "ipv4",
    "ipv6",
    "yaml",
    "entity",
    "user",
    "team",
    "proto",
    "markdown",
    "multi-line",
    "labeled-url",
)
ENTITY_EVENTS = ("ENTITY_CREATED", "ENTITY_UPDATED", "ENTITY_DELETED", "ANY_ENTITY_CHANGE")
RUN_EVENTS = ("RUN_CREATED", "RUN_UPDATED", "ANY_RUN_CHANGE")
TIMER_EVENT = "TIMER_PROPERTY_EXPIRED"
METHODS = ("POST", "PUT", "PATCH", "GET", "DELETE")
SUPPORTED = ("WEBHOOK", "GITHUB", "GITLAB", "UPSERT_ENTITY", "INTEGRATION_ACTION")
UNSUPPORTED = ("AZURE_DEVOPS", "KAFKA")
INTEGRATION_ACTION = "INTEGRATION_ACTION"
_INTEGRATION_KEYS = frozenset(
    ("type", "installationId", "integrationActionType", "integrationActionExecutionProperties")
)
# An integration's identifier (its installationId), as integrations are created with.
_INSTALLATION_ID = re.compile(r"^[A-Za-z0-9@_.+:=-]{1,100}$")
DEFINITION_KEYS = (
    "identifier",
    "title",
    "icon",
    "description",
    "trigger",
    "invocationMethod",
    "requiredApproval",
    "approvalNotification",
    "publish",
    "allowAnyoneToViewRuns",
)
_KEYS = frozenset(DEFINITION_KEYS)
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)


def normalise(body: Any, scope: Scope) -> dict[str, Any]:
    """The definition as stored, or Invalid naming every problem."""
    problems = Problems()
    if not isinstance(body, dict):
        problems.add("/", "an action is an object")
        problems.raise_if_any("The action is invalid")
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        problems.add("/", f"unknown field(s) {', '.join(unknown)}")
    if not isinstance(body.get("identifier"), str) or not valid_action_identifier(
        body["identifier"]
    ):
        problems.add(
            "/identifier", "identifier: letters, digits, @_.+:=- (at most 100), not . or .."
        )
    for key, limit in (("title", 200), ("icon", 200), ("description", 2000)):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            problems.add(f"/{key}", f"{key} must be a string of at most {limit} characters")
    for key in ("publish", "allowAnyoneToViewRuns"):
        if key in body and not isinstance(body[key], bool):
            problems.add(f"/{key}", f"{key} must be true or false")
    _trigger(body.get("trigger"), scope, problems)
    _invocation(body.get("invocationMethod"), scope, problems)
    _approval(body, problems)
    problems.raise_if_any("The action is invalid")
    out = {key: body[key] for key in _KEYS if key in body}
    out.setdefault("requiredApproval", False)
    out.setdefault("publish", True)
    return out


def _blueprint(value: Any, pointer: str, scope: Scope, problems: Problems) -> str | None:
    if not isinstance(value, str) or value not in scope.blueprints:
        problems.add(pointer, f"blueprint {value!r} does not exist")
        return None
    return value


def _trigger(trigger: Any, scope: Scope, problems: Problems) -> None:
    if not isinstance(trigger, dict):
        problems.add("/trigger", "trigger is required: {type: self-service | automation, ...}")
        return
    kind = trigger.get("type")
    if kind == "self-service":
        _self_service(trigger, scope, problems)
    elif kind == "automation":
        _automation(trigger, scope, problems)
    else:
        problems.add("/trigger/type", "type must be 'self-service' or 'automation'")


def _self_service(trigger: dict[str, Any], scope: Scope, problems: Problems) -> None:
    operation = trigger.get("operation")
    if operation not in OPERATIONS:
        problems.add("/trigger/operation", f"operation must be one of {', '.join(OPERATIONS)}")
    blueprint = None
    if trigger.get("blueprintIdentifier") is not None:
        blueprint = _blueprint(
            trigger["blueprintIdentifier"], "/trigger/blueprintIdentifier", scope, problems
        )
    elif operation in ("DAY-2", "DELETE"):
        problems.add("/trigger/blueprintIdentifier", f"a {operation} action acts on a blueprint")
    for key in ("actionCardButtonText", "executeActionButtonText"):
        text = trigger.get(key)
        if text is not None and (not isinstance(text, str) or not 1 <= len(text) <= 15):
            problems.add(f"/trigger/{key}", f"{key} is 1..15 characters")
    _inputs(trigger.get("userInputs"), scope, problems)
    condition = trigger.get("condition")
    if condition is not None:
        if operation not in ("DAY-2", "DELETE"):
            problems.add("/trigger/condition", "condition applies to DAY-2 and DELETE actions")
        elif not isinstance(condition, dict) or condition.get("type") != "SEARCH":
            problems.add("/trigger/condition", "condition is {type: SEARCH, combinator, rules}")
        elif blueprint is not None:
            query = {k: v for k, v in condition.items() if k != "type"}
            checked = Scope(scope.org_id, scope.blueprints, [blueprint], now=scope.now)
            try:
                Compiler(checked).compile(query, "/trigger/condition")
            except Invalid as exc:
                for detail in exc.details or []:
                    problems.add(str(detail["pointer"]), str(detail["message"]))


def _inputs(inputs: Any, scope: Scope, problems: Problems) -> None:
    if not isinstance(inputs, dict) or not isinstance(inputs.get("properties", {}), dict):
        problems.add("/trigger/userInputs", "userInputs is {properties: {...}, required?, order?}")
        return
    props: dict[str, Any] = inputs.get("properties", {})
    for name, spec in props.items():
        pointer = f"/trigger/userInputs/properties/{name}"
        if not isinstance(spec, dict):
            problems.add(pointer, "an input is an object with a type")
            continue
        if spec.get("type") not in INPUT_TYPES:
            problems.add(f"{pointer}/type", f"type must be one of {', '.join(INPUT_TYPES)}")
        fmt = spec.get("format")
        if fmt is not None and fmt not in INPUT_FORMATS:
            problems.add(f"{pointer}/format", f"unknown format {fmt!r}")
        if fmt == "entity" or (
            spec.get("type") == "array" and (spec.get("items") or {}).get("format") == "entity"
        ):
            holder = spec if fmt == "entity" else spec.get("items") or {}
            _blueprint(holder.get("blueprint"), f"{pointer}/blueprint", scope, problems)
        if "pattern" in spec:
            check_pattern(spec["pattern"], f"{pointer}/pattern", problems)
        enum = spec.get("enum")
        if enum is not None and (not isinstance(enum, list) or not enum):
            problems.add(f"{pointer}/enum", "enum must be a non-empty list")
    required = inputs.get("required")
    if isinstance(required, list):
        for i, name in enumerate(required):
            if name not in props:
                problems.add(f"/trigger/userInputs/required/{i}", f"{name!r} is not an input")
    elif required is not None and not (
        isinstance(required, dict) and isinstance(required.get("jqQuery"), str)
    ):
        problems.add("/trigger/userInputs/required", "required is a list of inputs or {jqQuery}")
    order = inputs.get("order")
    if order is not None:
        if not isinstance(order, list):
            problems.add("/trigger/userInputs/order", "order is a list of inputs")
        else:
            for i, name in enumerate(order):
                if name not in props:
                    problems.add(f"/trigger/userInputs/order/{i}", f"{name!r} is not an input")


def _automation(trigger: dict[str, Any], scope: Scope, problems: Problems) -> None:
    event = trigger.get("event")
    if not isinstance(event, dict):
        problems.add("/trigger/event", "event is required: {type, blueprintIdentifier, ...}")
        return
    kind = event.get("type")
    if kind in ENTITY_EVENTS or kind == TIMER_EVENT:
        blueprint = _blueprint(
            event.get("blueprintIdentifier"), "/trigger/event/blueprintIdentifier", scope, problems
        )
        if kind == TIMER_EVENT and blueprint is not None:
            prop = scope.blueprints[blueprint]["schema"]["properties"].get(
                event.get("propertyIdentifier")
            )
            if not prop or prop.get("format") != "timer":
                problems.add(
                    "/trigger/event/propertyIdentifier", "a timer property of the blueprint"
                )
    elif kind in RUN_EVENTS:
        if not isinstance(event.get("actionIdentifier"), str) or not valid_action_identifier(
            event["actionIdentifier"]
        ):
            problems.add("/trigger/event/actionIdentifier", "the action whose runs trigger this")
    else:
        names = ", ".join((*ENTITY_EVENTS, TIMER_EVENT, *RUN_EVENTS))
        problems.add("/trigger/event/type", f"type must be one of {names}")
    condition = trigger.get("condition")
    if condition is not None:
        expressions = condition.get("expressions") if isinstance(condition, dict) else None
        if (
            not isinstance(condition, dict)
            or condition.get("type") != "JQ"
            or not isinstance(expressions, list)
            or condition.get("combinator", "and") not in ("and", "or")
        ):
            problems.add("/trigger/condition", "condition is {type: JQ, expressions: [...]}")
        else:
            for i, expression in enumerate(expressions):
                _jq(expression, f"/trigger/condition/expressions/{i}", problems)


def _invocation(method: Any, scope: Scope, problems: Problems) -> None:
    if not isinstance(method, dict):
        problems.add("/invocationMethod", "invocationMethod is required: {type, ...}")
        return
    kind = method.get("type")
    pointer = "/invocationMethod"
    if kind in UNSUPPORTED:
        problems.add(f"{pointer}/type", f"{kind} invocations are not available in Portolan")
        return
    if kind not in SUPPORTED:
        problems.add(f"{pointer}/type", f"type must be one of {', '.join(SUPPORTED)}")
        return
    if kind == INTEGRATION_ACTION:
        _integration_action(method, pointer, problems)
        return
    required = {
        "WEBHOOK": ("url",),
        "GITHUB": ("org", "repo", "workflow"),
        "GITLAB": ("projectName", "groupName"),
        "UPSERT_ENTITY": ("blueprintIdentifier",),
    }[kind]
    for key in required:
        if not isinstance(method.get(key), str) or not method[key]:
            problems.add(f"{pointer}/{key}", f"{key} is required")
    if kind == "WEBHOOK":
        if method.get("agent") not in (None, False, "false"):
            problems.add(f"{pointer}/agent", "on-premise agents are not available in Portolan")
        if method.get("method", "POST") not in METHODS:
            problems.add(f"{pointer}/method", f"method must be one of {', '.join(METHODS)}")
        url = method.get("url")
        if isinstance(url, str) and "{{" not in url and not re.match(r"^https?://", url):
            problems.add(f"{pointer}/url", "url must be an http(s) URL (or a {{ }} template)")
        headers = method.get("headers")
        if headers is not None and (
            not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())
        ):
            problems.add(f"{pointer}/headers", "headers map names to strings")
    if kind == "UPSERT_ENTITY":
        if method.get("blueprintIdentifier") is not None:
            _blueprint(
                method["blueprintIdentifier"], f"{pointer}/blueprintIdentifier", scope, problems
            )
        if not isinstance(method.get("mapping"), dict):
            problems.add(f"{pointer}/mapping", "mapping is {identifier, title, properties, ...}")
    for key in ("tokenSecret",):
        secret = method.get(key)
        if secret is not None and (not isinstance(secret, str) or not secret):
            problems.add(f"{pointer}/{key}", "tokenSecret names an organization secret")
    _templates(method, pointer, problems)


def _integration_action(method: dict[str, Any], pointer: str, problems: Problems) -> None:
    """Port's shape (no other keys); the installation need not exist yet (an integration
    is created when it first starts); templates compile and name no secret."""
    for key in sorted(set(method) - _INTEGRATION_KEYS):
        problems.add(f"{pointer}/{key}", f"unknown field {key!r} of an INTEGRATION_ACTION")
    installation = method.get("installationId")
    if not isinstance(installation, str) or not _INSTALLATION_ID.match(installation):
        problems.add(
            f"{pointer}/installationId",
            "installationId is the integration's identifier: letters, digits, @_.+:=- "
            "(at most 100)",
        )
    action_type = method.get("integrationActionType")
    if not isinstance(action_type, str) or not 1 <= len(action_type) <= 100:
        problems.add(
            f"{pointer}/integrationActionType",
            "integrationActionType is required: the integration's action to run "
            "(e.g. dispatch_workflow)",
        )
    properties = method.get("integrationActionExecutionProperties")
    if not isinstance(properties, dict):
        problems.add(
            f"{pointer}/integrationActionExecutionProperties",
            "integrationActionExecutionProperties is required: an object",
        )
        return
    where = f"{pointer}/integrationActionExecutionProperties"
    _templates(properties, where, problems)
    for name in sorted(templates.referenced_secrets(properties)):
        problems.add(
            where,
            f"secret {name} cannot be used by an INTEGRATION_ACTION: its payload is handed "
            "to the integration and shown on the run (the integration holds its own "
            "credentials)",
        )


def _templates(value: Any, pointer: str, problems: Problems) -> None:
    """Every `{{ jq }}` template inside a value compiles."""
    if isinstance(value, str):
        for match in _TEMPLATE.finditer(value):
            _jq(match.group(1).strip(), pointer, problems)
    elif isinstance(value, dict):
        for key, item in value.items():
            _templates(item, f"{pointer}/{key}", problems)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _templates(item, f"{pointer}/{index}", problems)


def _jq(expression: Any, pointer: str, problems: Problems) -> None:
    if not isinstance(expression, str) or not expression.strip():
        problems.add(pointer, "a jq expression is required")
        return
    check_jq(expression, pointer, problems)


def _approval(body: dict[str, Any], problems: Problems) -> None:
    approval = body.get("requiredApproval")
    if approval is not None and not isinstance(approval, bool):
        if not (isinstance(approval, dict) and approval.get("type") in ("ANY", "ALL")):
            problems.add("/requiredApproval", "requiredApproval is true, false or {type: ANY|ALL}")
    notification = body.get("approvalNotification")
    if notification is not None:
        if not isinstance(notification, dict) or notification.get("type") not in (
            "webhook",
            "email",
        ):
            problems.add("/approvalNotification", "approvalNotification is {type: webhook|email}")
        elif notification["type"] == "webhook" and not isinstance(notification.get("url"), str):
            problems.add("/approvalNotification/url", "a webhook notification needs a url")
