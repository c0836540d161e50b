"""Webhook definitions in Port's shape: checked and normalised, every problem named by its
JSON pointer; and the mappings compiled into the templates the worker renders.

A definition: `{identifier?, title, description?, icon?, enabled?, integrationType?,
mappings?, security?}`. A mapping: `{blueprint, operation?, filter?, itemsToParse?,
entity: {identifier, title?, icon?, team?, properties?, relations?}}` whose strings are jq
expressions over `{body, headers, queryParams, item}`. `operation` is "create" (the
default), "delete", `{type: "create"}` or `{type: "delete", deleteDependents?}`; a delete
mapping's entity names only the identifier.

`security.secret` is write-only: responses say whether one is set (`secretSet`), never
what it is. A definition without a `secret` key keeps the stored one while it still names
a signature algorithm (so reading a webhook and writing it back keeps its secret);
`"secret": null` removes it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Final

from app.catalog.validation import Problems, check_jq, valid_blueprint_identifier, valid_key
from app.kit.errors import Invalid

MAX_IDENTIFIER = 30
MAX_TITLE = 30
MAX_DESCRIPTION = 200
MAX_ICON = 200
MAX_MAPPINGS = 50
MAX_EXPRESSION = 10_000
# A mapping's search query (a relation's or the team's): its rules, and how deep they nest.
_MAX_QUERY_RULES = 50
_MAX_QUERY_DEPTH = 5
MAX_SECRET = 1000
MAX_PREFIX = 100
ALGORITHMS = ("sha1", "sha256", "plain")
INTEGRATION_TYPES = ("custom", "template")

_IDENTIFIER = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9@_.+:=-]{1,30}$")
# An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
_KEYS = frozenset(
    {
        "identifier",
        "title",
        "description",
        "icon",
        "enabled",
        "integrationType",
        "mappings",
        "security",
    }
)
# What responses carry besides the definition: accepted in a body and ignored, so a
# webhook read from the API can be written back as it is.
READ_ONLY_KEYS = frozenset(
    {"webhookKey", "url", "createdAt", "createdBy", "updatedAt", "updatedBy"}
)
_SECURITY_KEYS = frozenset(
    {
        "secret",
        "signatureHeaderName",
        "signatureAlgorithm",
        "signaturePrefix",
        "requestIdentifierPath",
    }
)
_SECURITY_READ_ONLY = frozenset({"secretSet"})
_MAPPING_KEYS = frozenset({"blueprint", "operation", "filter", "itemsToParse", "entity"})
_ENTITY_KEYS = frozenset({"identifier", "title", "icon", "team", "properties", "relations"})


class _Keep:
    """The stored secret stays (the definition did not mention it)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()


@dataclass(slots=True)
class Definition:
    identifier: str
    title: str
    description: str | None
    icon: str | None
    enabled: bool
    integration_type: str
    mappings: list[dict[str, Any]]
    # signatureHeaderName, signatureAlgorithm, signaturePrefix, requestIdentifierPath
    security: dict[str, Any]
    secret: str | _Keep | None
    # Blueprints the mappings write to, with the pointer of their first mention.
    blueprints: dict[str, str] = field(default_factory=dict)


def new_identifier() -> str:
    return "webhook_" + secrets.token_hex(6)


# ---------------------------------------------------------------------------------------
# jq expressions as templates


def template_of(expression: str) -> str:
    """The `{{ jq }}` template evaluating `expression` (app.dispatch.templates).

    A template ends at the first `}}`, so every `}}` of the expression is taken apart
    without changing what it means: in code a space goes between the braces, in a string
    literal a `}` is written as its escape `\\u007d`, in a comment it is blanked."""
    out: list[str] = []
    # Contexts: "code" (the expression or a string interpolation `\\(...)`) and "string".
    stack: list[str] = ["code"]
    depths: list[int] = []  # open parentheses in each interpolation
    i, n = 0, len(expression)
    while i < n:
        ch = expression[i]
        if stack[-1] == "string":
            if ch == "\\":
                if expression[i + 1 : i + 2] == "(":
                    stack.append("code")
                    depths.append(0)
                    out.append("\\(")
                    i += 2
                    continue
                out.append(expression[i : i + 2])
                i += 2
                continue
            if ch == '"':
                stack.pop()
            out.append("\\u007d" if ch == "}" else ch)
            i += 1
            continue
        if ch == '"':
            stack.append("string")
        elif ch == "#":
            end = expression.find("\n", i)
            end = n if end < 0 else end
            out.append(expression[i:end].replace("}", " "))
            i = end
            continue
        elif ch == "(" and depths:
            depths[-1] += 1
        elif ch == ")" and depths:
            if depths[-1] == 0:  # the end of an interpolation: back in its string
                stack.pop()
                depths.pop()
            else:
                depths[-1] -= 1
        elif ch == "}" and out and out[-1].endswith("}"):
            out.append(" ")
        out.append(ch)
        i += 1
    return "{{ " + "".join(out) + " }}"


def _check_expression(value: Any, pointer: str, problems: Problems) -> bool:
    if not isinstance(value, str) or not value.strip():
        problems.add(pointer, "must be a jq expression (a non-empty string)")
        return False
    if len(value) > MAX_EXPRESSION:
        problems.add(pointer, f"a jq expression has at most {MAX_EXPRESSION} characters")
        return False
    before = len(problems.items)
    check_jq(value, pointer, problems)
    if len(problems.items) == before:
        # What the worker evaluates: the same expression, taken apart at its `}}`.
        check_jq(template_of(value)[3:-3], pointer, problems)
    return len(problems.items) == before


def _check_query(value: Any, pointer: str, problems: Problems, depth: int = 0) -> None:
    """A search query in a mapping (Port's shape): `combinator` and each rule's fields are
    jq expressions (`'"and"'`, `.body.team`); `rules` is a list of rules or queries."""
    if depth >= _MAX_QUERY_DEPTH:
        problems.add(pointer, f"queries nest at most {_MAX_QUERY_DEPTH} deep")
        return
    unknown = sorted(set(value) - {"combinator", "rules"})
    if unknown:
        problems.add(pointer, f"a search query has combinator and rules, not {', '.join(unknown)}")
    if "combinator" in value:
        _check_expression(value["combinator"], f"{pointer}/combinator", problems)
    rules = value.get("rules")
    if not isinstance(rules, list) or not rules or len(rules) > _MAX_QUERY_RULES:
        problems.add(f"{pointer}/rules", f"rules must be a list of 1..{_MAX_QUERY_RULES} rules")
        return
    for i, rule in enumerate(rules):
        at = f"{pointer}/rules/{i}"
        if not isinstance(rule, dict) or not rule:
            problems.add(at, "a rule is an object of jq expressions")
        elif "rules" in rule:
            _check_query(rule, at, problems, depth + 1)
        else:
            for name, expression in rule.items():
                if not valid_key(name):
                    problems.add(f"{at}/{_escape(name)}", "not a rule's field")
                else:
                    _check_expression(expression, f"{at}/{_escape(name)}", problems)


def query_expression(query: dict[str, Any]) -> str:
    """One jq expression building a mapping's search query from its jq fields (each in
    parentheses and ended by a line break, so a trailing comment ends with it)."""

    def build(part: dict[str, Any]) -> str:
        fields = []
        for name, value in part.items():
            if name == "rules":
                rendered = "[" + ", ".join(build(rule) for rule in value) + "]"
            else:
                rendered = f"({value}\n)"
            fields.append(f"{json.dumps(name)}: {rendered}")
        return "{" + ", ".join(fields) + "}"

    if "combinator" not in query:
        query = {"combinator": '"and"', **query}
    return build(query)


# ---------------------------------------------------------------------------------------
# Definitions


def _optional_text(body: dict[str, Any], key: str, limit: int, problems: Problems) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        problems.add(f"/{key}", f"{key} must be a string of at most {limit} characters")
        return None
    return value


def _operation(raw: Any, pointer: str, problems: Problems) -> tuple[bool, bool]:
    """(delete?, deleteDependents?) of a mapping's `operation`."""
    if raw is None or raw == "create":
        return False, False
    if raw == "delete":
        return True, False
    if isinstance(raw, dict) and raw.get("type") in ("create", "delete"):
        unknown = sorted(set(raw) - {"type", "deleteDependents"})
        if raw["type"] == "create" and "deleteDependents" in raw:
            unknown.append("deleteDependents")
        if unknown:
            problems.add(pointer, f"unknown key(s): {', '.join(unknown)}")
        dependents = raw.get("deleteDependents", False)
        if not isinstance(dependents, bool):
            problems.add(pointer + "/deleteDependents", "deleteDependents must be true or false")
            dependents = False
        return raw["type"] == "delete", dependents
    problems.add(
        pointer,
        'operation must be "create", "delete", {"type": "create"} or '
        '{"type": "delete", "deleteDependents": true|false}',
    )
    return False, False


def _check_entity(raw: Any, pointer: str, delete: bool, problems: Problems) -> None:
    if not isinstance(raw, dict):
        problems.add(pointer, "entity must be an object of jq expressions")
        return
    allowed = frozenset({"identifier"}) if delete else _ENTITY_KEYS
    unknown = sorted(set(raw) - allowed)
    if unknown:
        what = "a delete mapping's entity names only its identifier" if delete else "unknown key"
        problems.add(pointer, f"{what}: {', '.join(unknown)}")
    if "identifier" not in raw:
        problems.add(pointer + "/identifier", "identifier is required")
    for key in ("identifier", "title", "icon", "team"):
        if key not in raw or key not in allowed:
            continue
        if isinstance(raw[key], dict):
            if key == "team":
                _check_query(raw[key], f"{pointer}/{key}", problems)
            else:
                problems.add(
                    f"{pointer}/{key}",
                    "search-query values are taken by relations and team only: give a jq "
                    "expression",
                )
            continue
        _check_expression(raw[key], f"{pointer}/{key}", problems)
    for section in ("properties", "relations"):
        if section not in raw or section not in allowed:
            continue
        values = raw[section]
        if not isinstance(values, dict):
            problems.add(f"{pointer}/{section}", f"{section} must map names to jq expressions")
            continue
        for name, expression in values.items():
            at = f"{pointer}/{section}/{_escape(name)}"
            if not valid_key(name):
                problems.add(at, "names match ^[A-Za-z0-9@_=\\-]+$ (at most 100 characters)")
            if isinstance(expression, dict):
                if section == "relations":
                    _check_query(expression, at, problems)
                else:
                    problems.add(at, "a property takes a jq expression")
                continue
            _check_expression(expression, at, problems)


def _escape(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _check_mapping(raw: Any, index: int, problems: Problems, blueprints: dict[str, str]) -> None:
    pointer = f"/mappings/{index}"
    if not isinstance(raw, dict):
        problems.add(pointer, "a mapping must be an object")
        return
    unknown = sorted(set(raw) - _MAPPING_KEYS)
    if unknown:
        problems.add(pointer, f"unknown key(s): {', '.join(unknown)}")
    blueprint = raw.get("blueprint")
    if not isinstance(blueprint, str) or not valid_blueprint_identifier(blueprint):
        problems.add(pointer + "/blueprint", "blueprint must be a blueprint identifier")
    else:
        blueprints.setdefault(blueprint, pointer + "/blueprint")
    delete, _ = _operation(raw.get("operation"), pointer + "/operation", problems)
    for key in ("filter", "itemsToParse"):
        if raw.get(key) is not None:
            _check_expression(raw[key], f"{pointer}/{key}", problems)
    if "entity" not in raw:
        problems.add(pointer + "/entity", "entity is required")
    else:
        _check_entity(raw["entity"], pointer + "/entity", delete, problems)


def _check_security(raw: Any, problems: Problems) -> tuple[dict[str, Any], str | _Keep | None]:
    if raw is None:
        return {}, KEEP
    if not isinstance(raw, dict):
        problems.add("/security", "security must be an object")
        return {}, KEEP
    unknown = sorted(set(raw) - _SECURITY_KEYS - _SECURITY_READ_ONLY)
    if unknown:
        problems.add("/security", f"unknown key(s): {', '.join(unknown)}")
    security: dict[str, Any] = {}
    header = raw.get("signatureHeaderName")
    if header not in (None, ""):
        if not isinstance(header, str) or not _HEADER_NAME.match(header):
            problems.add(
                "/security/signatureHeaderName", "signatureHeaderName must be an HTTP header name"
            )
        else:
            security["signatureHeaderName"] = header
    algorithm = raw.get("signatureAlgorithm")
    if algorithm not in (None, ""):
        if algorithm not in ALGORITHMS:
            problems.add(
                "/security/signatureAlgorithm",
                f"signatureAlgorithm must be one of {', '.join(ALGORITHMS)}",
            )
        else:
            security["signatureAlgorithm"] = algorithm
    prefix = raw.get("signaturePrefix")
    if prefix not in (None, ""):
        if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX:
            problems.add(
                "/security/signaturePrefix",
                f"signaturePrefix must be a string of at most {MAX_PREFIX} characters",
            )
        else:
            security["signaturePrefix"] = prefix
    path = raw.get("requestIdentifierPath")
    if path not in (None, "") and _check_expression(
        path, "/security/requestIdentifierPath", problems
    ):
        security["requestIdentifierPath"] = path
    secret: str | _Keep | None = KEEP
    if "secret" in raw:
        value = raw["secret"]
        if value is None or value == "":
            secret = None
        elif not isinstance(value, str) or len(value) > MAX_SECRET:
            problems.add(
                "/security/secret", f"secret must be a string of at most {MAX_SECRET} characters"
            )
        else:
            secret = value
    return security, secret


def normalise(body: Any) -> Definition:
    """A whole definition (create, replace, or a patch applied to the stored one);
    raises Invalid naming every problem. The blueprints' existence is checked by the
    caller (Definition.blueprints)."""
    if not isinstance(body, dict):
        raise Invalid("A webhook must be a JSON object")
    problems = Problems()
    unknown = sorted(set(body) - _KEYS - READ_ONLY_KEYS)
    if unknown:
        problems.add("", f"unknown key(s): {', '.join(unknown)}")
    identifier = body.get("identifier")
    if identifier is None:
        identifier = new_identifier()
    elif not isinstance(identifier, str) or not _IDENTIFIER.match(identifier):
        problems.add(
            "/identifier",
            f"identifier must be 1-{MAX_IDENTIFIER} letters, digits or @_.+:=- (not '.' or '..')",
        )
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > MAX_TITLE:
        problems.add("/title", f"title is required: a string of 1-{MAX_TITLE} characters")
    description = _optional_text(body, "description", MAX_DESCRIPTION, problems)
    icon = _optional_text(body, "icon", MAX_ICON, problems)
    enabled = body.get("enabled", True)
    if enabled is None:
        enabled = True
    if not isinstance(enabled, bool):
        problems.add("/enabled", "enabled must be true or false")
    integration_type = body.get("integrationType") or "custom"
    if integration_type not in INTEGRATION_TYPES:
        problems.add(
            "/integrationType", f"integrationType must be one of {', '.join(INTEGRATION_TYPES)}"
        )
    mappings = body.get("mappings")
    if mappings is None:
        mappings = []
    blueprints: dict[str, str] = {}
    if not isinstance(mappings, list):
        problems.add("/mappings", "mappings must be an array")
        mappings = []
    elif len(mappings) > MAX_MAPPINGS:
        problems.add("/mappings", f"a webhook has at most {MAX_MAPPINGS} mappings")
    else:
        for index, mapping in enumerate(mappings):
            _check_mapping(mapping, index, problems, blueprints)
    security, secret = _check_security(body.get("security"), problems)
    problems.raise_if_any("Invalid webhook")
    return Definition(
        identifier=identifier,
        title=str(title),
        description=description,
        icon=icon,
        enabled=enabled,
        integration_type=integration_type,
        mappings=mappings,
        security=security,
        secret=secret,
        blueprints=blueprints,
    )


def resolve_secret(definition: Definition, stored: str | None) -> str | None:
    """The secret the definition ends up with (`stored`: the current one, decrypted);
    raises Invalid when the signature settings and the secret do not go together."""
    security = definition.security
    secret = definition.secret
    if isinstance(secret, _Keep):
        secret = stored if "signatureAlgorithm" in security else None
    problems = Problems()
    if "signatureAlgorithm" in security:
        if secret is None:
            problems.add("/security/secret", "a signatureAlgorithm needs a secret")
        if "signatureHeaderName" not in security:
            problems.add(
                "/security/signatureHeaderName",
                "a signatureAlgorithm needs the header the signature comes in",
            )
    elif secret is not None:
        problems.add(
            "/security/signatureAlgorithm",
            "a secret needs a signatureAlgorithm (sha1, sha256 or plain)",
        )
    elif "signatureHeaderName" in security or "signaturePrefix" in security:
        problems.add(
            "/security/signatureAlgorithm",
            "signatureHeaderName and signaturePrefix need a signatureAlgorithm and a secret",
        )
    problems.raise_if_any("Invalid webhook")
    return secret


# ---------------------------------------------------------------------------------------
# Mappings as the worker applies them


@dataclass(frozen=True, slots=True)
class Mapping:
    index: int
    blueprint: str
    delete: bool
    delete_dependents: bool
    items: str | None  # the itemsToParse template
    # {"filter"?: template, "entity": {key: template | {name: template}}}
    template: dict[str, Any]

    @property
    def has_filter(self) -> bool:
        return "filter" in self.template


def _leaf(value: Any) -> str:
    """The template of a jq expression, or of a search query made of them."""
    return template_of(query_expression(value) if isinstance(value, dict) else value)


def compile_mapping(index: int, raw: dict[str, Any]) -> Mapping:
    """A stored (checked) mapping as templates over `{body, headers, queryParams, item}`."""
    problems = Problems()
    delete, dependents = _operation(raw.get("operation"), "", problems)
    entity: dict[str, Any] = {}
    for key, value in raw["entity"].items():
        if key in ("properties", "relations"):
            entity[key] = {name: _leaf(expr) for name, expr in value.items()}
        else:
            entity[key] = _leaf(value)
    template: dict[str, Any] = {}
    if raw.get("filter") is not None:
        template["filter"] = template_of(raw["filter"])
    template["entity"] = entity
    items = raw.get("itemsToParse")
    return Mapping(
        index=index,
        blueprint=raw["blueprint"],
        delete=delete,
        delete_dependents=dependents,
        items=template_of(items) if items is not None else None,
        template=template,
    )
