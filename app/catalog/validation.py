"""Blueprint definitions: JSON Schema 2020-12 meta-schema plus Port's property rules.

Every problem found is collected (not just the first), each named by a JSON pointer into
the submitted blueprint, and reported together as one 422.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator

# Python's own regex parser (its public alias, sre_parse, is deprecated since 3.11); only
# used to spot nested repetition, never to match anything.
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

import jsonschema_rs
import pydantic_core

from app.kit import sandbox
from app.kit.errors import Invalid
from app.kit.jq_child import module_directive

PROPERTY_TYPES = ("string", "number", "boolean", "object", "array")
STRING_FORMATS = (
    "date-time",
    "url",
    "email",
    "idn-email",
    "ipv4",
    "ipv6",
    "markdown",
    "yaml",
    "user",
    "blueprints",
    "team",
    "timer",
    "proto",
    "labeled-url",
)
SPECS = ("open-api", "embedded-url", "async-api")
COLORS = (
    "blue",
    "turquoise",
    "orange",
    "purple",
    "pink",
    "yellow",
    "green",
    "red",
    "gold",
    "silver",
    "paleBlue",
    "darkGray",
    "lightGray",
    "bronze",
    "lime",
    "olive",
    "brown",
)
PROPERTY_KEYS = {
    "type",
    "title",
    "description",
    "icon",
    "format",
    "spec",
    "specAuthentication",
    "default",
    "enum",
    "enumColors",
    "items",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "properties",
    "required",
    "additionalProperties",
    "const",
    # Portolan's: a range index for a number or date-time property (app/search/indexes.py).
    "indexed",
}
ITEM_TYPES = ("string", "number", "boolean", "object", "array")

_KEY_RE = re.compile(r"^[A-Za-z0-9@_=\-]+$")  # property / relation identifiers (Port's)
_BLUEPRINT_CHARS = frozenset("0123456789@_.+:\\/-")
_ENTITY_CHARS = _BLUEPRINT_CHARS | {"="}
_ACTION_CHARS = frozenset("0123456789@_.+:=-")
MAX_IDENTIFIER = 100
MAX_ENTITY_IDENTIFIER = 1000


def _valid_identifier(value: str, allowed: frozenset[str], max_length: int) -> bool:
    """Port's `^(?!\\.{1,2}$)[\\p{L}<allowed>]+$`: letters of any script plus `allowed`."""
    if not value or len(value) > max_length or value in (".", ".."):
        return False
    return all(ch.isalpha() or ch in allowed for ch in value)


def valid_blueprint_identifier(value: str) -> bool:
    return _valid_identifier(value, _BLUEPRINT_CHARS, MAX_IDENTIFIER)


def valid_entity_identifier(value: str) -> bool:
    """As for blueprints, plus `=`, at most 1000 characters."""
    return _valid_identifier(value, _ENTITY_CHARS, MAX_ENTITY_IDENTIFIER)


def valid_action_identifier(value: str) -> bool:
    """Actions: letters, digits and `@_.+:=-` (no slashes), at most 100 characters."""
    return _valid_identifier(value, _ACTION_CHARS, MAX_IDENTIFIER)


def check_url_identifier(body: Any, identifier: str) -> None:
    """A body naming a different identifier than its URL is refused."""
    if isinstance(body, dict) and body.get("identifier") not in (None, identifier):
        raise Invalid("The identifier in the body does not match the URL")


def _storable(text: str) -> bool:
    """PostgreSQL stores no NUL character (neither in text nor in jsonb) and UTF-8 has no
    unpaired surrogate (JSON's `\\ud800` escapes decode to one)."""
    if text.isascii():
        return "\x00" not in text
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unstorable_text(value: Any, pointer: str = "") -> str | None:
    """The JSON pointer of the first string (object keys included) in `value` that
    PostgreSQL cannot store: a NUL character or an unpaired surrogate; None when all are
    fine."""
    if isinstance(value, str):
        return None if _storable(value) else (pointer or "/")
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _storable(key):
                return _join(pointer, shown(key))
            found = unstorable_text(item, _join(pointer, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = unstorable_text(item, _join(pointer, index))
            if found is not None:
                return found
    return None


def shown(text: str) -> str:
    """`text` with its NUL characters and unpaired surrogates written as escapes, safe to
    put in an answer."""
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\u0000")


def first_unstorable(value: Any) -> str | None:
    """As unstorable_text, with a fast first look: the value encoded as JSON (which fails
    on an unpaired surrogate and writes a NUL as `\\u0000`); only a value that fails it
    is walked for the pointer."""
    try:
        encoded = pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError:
        return unstorable_text(value) or "/"
    if b"\\u0000" not in encoded:
        return None
    return unstorable_text(value)


UNSTORABLE_TEXT = "contains a NUL character or an unpaired surrogate, which cannot be stored"


def valid_key(value: str) -> bool:
    return 0 < len(value) <= MAX_IDENTIFIER and bool(_KEY_RE.match(value))


class Problems:
    """Collects (pointer, message) pairs and raises them as one Invalid."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []
        self.jq_seconds = 0.0  # spent compiling the definition's jq (check_jq)

    def add(self, pointer: str, message: str) -> None:
        self.items.append({"pointer": pointer, "message": message})

    def raise_if_any(self, what: str) -> None:
        if not self.items:
            return
        summary = "; ".join(f"{i['pointer'] or '/'}: {i['message']}" for i in self.items[:5])
        more = f" (and {len(self.items) - 5} more)" if len(self.items) > 5 else ""
        raise Invalid(f"{what}: {summary}{more}", details=self.items)


def _ptr(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def check_pattern(pattern: Any, pointer: str, problems: Problems) -> None:
    if not isinstance(pattern, str):
        problems.add(pointer, "pattern must be a string")
        return
    try:
        # The validator runs patterns on a linear-time engine; compiling one tells us the
        # engine accepts it (no look-around, no back-references).
        jsonschema_rs.validator_for(
            {"pattern": pattern}, pattern_options=jsonschema_rs.RegexOptions()
        )
    except jsonschema_rs.ValidationError:
        problems.add(pointer, f"{pattern!r} is not a valid regular expression")
        return
    if _could_run_away(pattern):
        problems.add(
            pointer,
            f"{pattern!r} nests repetitions (like '(a+)+'): backtracking engines, such as a "
            "browser's, can take exponential time on it; rewrite it without nested quantifiers",
        )


def _could_run_away(pattern: str) -> bool:
    try:
        parsed = sre_parse.parse(pattern)
    except (sre_constants.error, RecursionError, OverflowError):
        return False  # syntax the linear engine accepted but Python's parser does not
    return _has_nested_repeat(parsed.data, inside_repeat=False)


_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT)


def _has_nested_repeat(items: Iterable[Any], *, inside_repeat: bool) -> bool:
    for op, arg in items:
        if op in _REPEATS:
            _low, high, body = arg
            unbounded = high == sre_constants.MAXREPEAT or high > 1
            if unbounded and _ambiguous_body(list(body)):
                return True
            if _has_nested_repeat(body, inside_repeat=inside_repeat or unbounded):
                return True
        elif op == sre_constants.SUBPATTERN:
            if _has_nested_repeat(arg[-1], inside_repeat=inside_repeat):
                return True
        elif op == sre_constants.BRANCH:
            branches = arg[1]
            if inside_repeat and len(branches) > 1 and _branches_overlap(branches):
                return True
            for branch in branches:
                if _has_nested_repeat(branch, inside_repeat=inside_repeat):
                    return True
    return False


def _flatten(body: list[Any]) -> list[Any]:
    """Items of a repeated body, with plain groups opened up."""
    out: list[Any] = []
    for op, arg in body:
        if op == sre_constants.SUBPATTERN:
            out.extend(_flatten(list(arg[-1])))
        else:
            out.append((op, arg))
    return out


def _ambiguous_body(body: list[Any]) -> bool:
    """A repeated body that itself holds an unbounded repeat can match one string in
    exponentially many ways, unless a mandatory character the inner repeat cannot match
    separates the rounds (as '-' does in '([a-z]+-)*')."""
    items = _flatten(body)
    inner = [
        arg[2]
        for op, arg in items
        if op in _REPEATS and (arg[1] == sre_constants.MAXREPEAT or arg[1] > 1)
    ]
    if not inner:
        return False
    for op, arg in items:
        if op == sre_constants.LITERAL and all(
            _single_char_match(list(rep), chr(arg)) is False for rep in inner
        ):
            return False
    return True


def _single_char_match(body: list[Any], ch: str) -> bool | None:
    """Whether a one-character body matches `ch`; None when it is not that simple."""
    if len(body) != 1:
        return None
    op, arg = body[0]
    if op == sre_constants.LITERAL:
        return chr(arg) == ch
    if op == sre_constants.NOT_LITERAL:
        return chr(arg) != ch
    if op == sre_constants.ANY:
        return ch != "\n"
    if op == sre_constants.IN:
        negate = False
        hit = False
        for kind, value in arg:
            if kind == sre_constants.NEGATE:
                negate = True
            elif kind == sre_constants.LITERAL:
                hit = hit or chr(value) == ch
            elif kind == sre_constants.RANGE:
                hit = hit or value[0] <= ord(ch) <= value[1]
            elif kind == sre_constants.CATEGORY:
                hit = hit or _category(value, ch)
            else:
                return None
        return hit != negate
    return None


def _category(category: Any, ch: str) -> bool:
    name = str(category)
    if "DIGIT" in name:
        result = ch.isdigit()
    elif "WORD" in name:
        result = ch.isalnum() or ch == "_"
    elif "SPACE" in name:
        result = ch.isspace()
    else:
        return True
    return not result if "NOT" in name else result


def _branches_overlap(branches: list[Any]) -> bool:
    # (a|aa)+ style: alternatives that can start with the same literal.
    firsts = []
    for branch in branches:
        items = list(branch)
        if not items:
            return True
        op, arg = items[0]
        if op != sre_constants.LITERAL:
            return False
        firsts.append(arg)
    return len(firsts) != len(set(firsts))


def json_type(value: Any) -> str:
    """A JSON value's type, as a message names it (what a mapping's jq gave)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _json_type_ok(value: Any, type_name: str) -> bool:
    return {
        "string": isinstance(value, str),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }.get(type_name, False)


def check_property(prop: Any, pointer: str, problems: Problems, *, is_item: bool = False) -> None:
    if not isinstance(prop, dict):
        problems.add(pointer, "must be an object")
        return
    type_name = prop.get("type")
    allowed = ITEM_TYPES if is_item else PROPERTY_TYPES
    if type_name not in allowed:
        problems.add(_join(pointer, "type"), f"type must be one of {', '.join(allowed)}")
        return
    if not is_item:
        unknown = sorted(set(prop) - PROPERTY_KEYS)
        if unknown:
            problems.add(pointer, f"unknown keyword(s): {', '.join(unknown)}")
        title = prop.get("title")
        if title is not None and (not isinstance(title, str) or len(title) > 100):
            problems.add(
                _join(pointer, "title"), "title must be a string of at most 100 characters"
            )
    indexed = prop.get("indexed")
    if indexed is not None and not is_item:
        if not isinstance(indexed, bool):
            problems.add(_join(pointer, "indexed"), "indexed must be true or false")
        elif indexed and type_name not in ("number", "string"):
            problems.add(
                _join(pointer, "indexed"),
                "indexed applies to number and date-time properties (range rules) and to "
                "string properties (text rules); equality and containment on every "
                "property are indexed already",
            )
    fmt = prop.get("format")
    if fmt is not None:
        if type_name != "string":
            problems.add(_join(pointer, "format"), "format applies to string properties only")
        elif fmt not in STRING_FORMATS:
            problems.add(_join(pointer, "format"), f"unknown format {fmt!r}")
    spec = prop.get("spec")
    if spec is not None and spec not in SPECS:
        problems.add(_join(pointer, "spec"), f"spec must be one of {', '.join(SPECS)}")
    enum = prop.get("enum")
    if enum is not None:
        if not isinstance(enum, list) or not enum:
            problems.add(_join(pointer, "enum"), "enum must be a non-empty array")
        else:
            for i, value in enumerate(enum):
                if value is not None and not _json_type_ok(value, type_name):
                    problems.add(_join(pointer, "enum", i), f"enum value is not a {type_name}")
    colors = prop.get("enumColors")
    if colors is not None:
        if not isinstance(colors, dict) or not isinstance(enum, list):
            problems.add(
                _join(pointer, "enumColors"), "enumColors needs an enum and maps its values"
            )
        else:
            for key, color in colors.items():
                if key not in [str(v) for v in enum]:
                    problems.add(_join(pointer, "enumColors", key), "not a value of the enum")
                if color not in COLORS:
                    problems.add(_join(pointer, "enumColors", key), f"unknown color {color!r}")
    if "pattern" in prop:
        if type_name != "string":
            problems.add(_join(pointer, "pattern"), "pattern applies to string properties only")
        else:
            check_pattern(prop["pattern"], _join(pointer, "pattern"), problems)
    _check_bounds(prop, pointer, problems, "minLength", "maxLength", integer=True)
    _check_bounds(prop, pointer, problems, "minimum", "maximum", integer=False)
    _check_bounds(prop, pointer, problems, "minItems", "maxItems", integer=True)
    if type_name == "array":
        items = prop.get("items")
        if items is not None:
            check_property(items, _join(pointer, "items"), problems, is_item=True)
    elif "items" in prop:
        problems.add(_join(pointer, "items"), "items applies to array properties only")


def _join(pointer: str, *parts: str | int) -> str:
    return pointer + _ptr(*parts)


def _check_bounds(
    prop: dict[str, Any], pointer: str, problems: Problems, low: str, high: str, *, integer: bool
) -> None:
    values = {}
    for key in (low, high):
        if key in prop:
            value = prop[key]
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok and integer:
                ok = isinstance(value, int) and value >= 0
            if not ok:
                kind = "a non-negative integer" if integer else "a number"
                problems.add(_join(pointer, key), f"{key} must be {kind}")
            else:
                values[key] = value
    if low in values and high in values and values[low] > values[high]:
        problems.add(_join(pointer, low), f"{low} is greater than {high}")


def check_schema(schema: Any, problems: Problems) -> None:
    """The blueprint's `schema`: `{"properties": {...}, "required": [...]}`."""
    if not isinstance(schema, dict):
        problems.add("/schema", "schema must be an object")
        return
    extra = sorted(set(schema) - {"properties", "required"})
    if extra:
        problems.add("/schema", f"unknown keyword(s): {', '.join(extra)}")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        problems.add("/schema/properties", "properties must be an object")
        props = {}
    for name, prop in props.items():
        pointer = _ptr("schema", "properties", name)
        if not valid_key(name):
            problems.add(pointer, "property identifiers match ^[A-Za-z0-9@_=\\-]+$ (at most 100)")
        check_property(prop, pointer, problems)
        if isinstance(prop, dict) and "default" in prop and not problems.items:
            _check_default(name, prop, pointer, problems)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        problems.add("/schema/required", "required must be an array of property identifiers")
    else:
        for i, name in enumerate(required):
            if name not in props:
                problems.add(_ptr("schema", "required", i), f"{name!r} is not a declared property")
    if not problems.items:
        try:
            jsonschema_rs.meta.validate({"type": "object", **schema})
        except jsonschema_rs.ValidationError as exc:
            problems.add("/schema", f"not a valid JSON Schema (2020-12): {exc.message}")


def _check_default(name: str, prop: dict[str, Any], pointer: str, problems: Problems) -> None:
    try:
        validator = jsonschema_rs.validator_for(
            {
                k: v
                for k, v in prop.items()
                if k not in ("default", "enumColors", "spec", "specAuthentication", "icon")
            },
            pattern_options=jsonschema_rs.RegexOptions(),
        )
    except jsonschema_rs.ValidationError:
        return
    if not validator.is_valid(prop["default"]):
        problems.add(_join(pointer, "default"), "default does not satisfy the property's schema")


def check_relations(relations: Any, problems: Problems) -> dict[str, dict[str, Any]]:
    """Shape of `relations`; returns them normalised (required/many default to false)."""
    if relations is None:
        return {}
    if not isinstance(relations, dict):
        problems.add("/relations", "relations must be an object")
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, rel in relations.items():
        pointer = _ptr("relations", name)
        if not valid_key(name):
            problems.add(pointer, "relation identifiers match ^[A-Za-z0-9@_=\\-]+$ (at most 100)")
        if not isinstance(rel, dict):
            problems.add(pointer, "must be an object")
            continue
        unknown = sorted(set(rel) - {"target", "title", "required", "many", "description", "type"})
        if unknown:
            problems.add(pointer, f"unknown keyword(s): {', '.join(unknown)}")
        target = rel.get("target")
        if not isinstance(target, str) or not valid_blueprint_identifier(target):
            problems.add(_join(pointer, "target"), "target must be a blueprint identifier")
        for flag in ("required", "many"):
            if flag in rel and not isinstance(rel[flag], bool):
                problems.add(_join(pointer, flag), f"{flag} must be a boolean")
        title = rel.get("title")
        if title is not None and (not isinstance(title, str) or len(title) > 100):
            problems.add(
                _join(pointer, "title"), "title must be a string of at most 100 characters"
            )
        out[name] = {
            **{k: v for k, v in rel.items() if k in ("title", "description", "type")},
            "target": target,
            "required": bool(rel.get("required", False)),
            "many": bool(rel.get("many", False)),
        }
    return out


def _entries(
    section: str, value: Any, problems: Problems
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(name, pointer, definition) of a derived-property section, reporting bad names and
    definitions that are not objects."""
    if not isinstance(value, dict):
        problems.add(f"/{section}", f"{section} must be an object")
        return
    for name, item in value.items():
        pointer = _ptr(section, name)
        if not valid_key(name):
            problems.add(pointer, "identifiers match ^[A-Za-z0-9@_=\\-]+$ (at most 100)")
        if not isinstance(item, dict):
            problems.add(pointer, "must be an object")
            continue
        yield name, pointer, item


def check_mirror_properties(mirrors: Any, relations: dict[str, Any], problems: Problems) -> None:
    for _name, pointer, mirror in _entries("mirrorProperties", mirrors, problems):
        path = mirror.get("path")
        if not isinstance(path, str) or "." not in path:
            problems.add(_join(pointer, "path"), "path must be 'relation[.relation...].property'")
        elif path.split(".", 1)[0] not in relations:
            problems.add(_join(pointer, "path"), f"{path.split('.', 1)[0]!r} is not a relation")


def check_calculation_properties(calcs: Any, problems: Problems) -> None:
    for _name, pointer, calc in _entries("calculationProperties", calcs, problems):
        if not isinstance(calc.get("calculation"), str) or not calc["calculation"].strip():
            problems.add(_join(pointer, "calculation"), "calculation must be a jq expression")
        else:
            check_jq(calc["calculation"], _join(pointer, "calculation"), problems)
        if calc.get("type") not in PROPERTY_TYPES:
            problems.add(_join(pointer, "type"), f"type must be one of {', '.join(PROPERTY_TYPES)}")


# jq is compiled here, on the server's event loop, to tell a definition's author what is
# wrong with it at once. Compiling costs more than linear time for some shapes (string
# interpolations above all), so what one definition may ask of it is bounded, and what one
# org may ask of it over time is paced (app/kit/sandbox.py, `before_compile`).
MAX_JQ_LENGTH = 10_000
MAX_JQ_INTERPOLATIONS = 256
JQ_COMPILE_BUDGET_SECONDS = 0.25  # of CPU time


def check_jq(expression: str, pointer: str, problems: Problems) -> None:
    import jq

    directive = module_directive(expression)
    if directive is not None:
        # Modules are files: tenants' jq sees its input and nothing else.
        problems.add(pointer, f"jq modules are not available ({directive})")
        return
    if len(expression) > MAX_JQ_LENGTH:
        problems.add(pointer, f"a jq expression has at most {MAX_JQ_LENGTH} characters")
        return
    if expression.count("\\(") > MAX_JQ_INTERPOLATIONS:
        problems.add(
            pointer, f"a jq expression has at most {MAX_JQ_INTERPOLATIONS} string interpolations"
        )
        return
    if problems.jq_seconds > JQ_COMPILE_BUDGET_SECONDS:
        problems.add(pointer, "the definition's jq takes too long to check: make it smaller")
        return
    sandbox.before_compile()  # the org's share of this process's time (503 past it)
    started, started_cpu = time.perf_counter(), time.thread_time()
    try:
        jq.compile(expression)
    except ValueError as exc:
        problems.add(pointer, f"not a valid jq expression: {exc}")
    finally:
        # The definition's budget counts the compiler's own work (CPU time), so whether a
        # definition is valid never depends on how loaded the machine is; the org's share
        # counts what the loop waited (wall time).
        problems.jq_seconds += time.thread_time() - started_cpu
        sandbox.after_compile(time.perf_counter() - started)


AGG_FUNCS = {"count", "sum", "average", "min", "max", "median"}


def check_aggregation_properties(aggs: Any, problems: Problems) -> None:
    for _name, pointer, agg in _entries("aggregationProperties", aggs, problems):
        target = agg.get("target")
        if not isinstance(target, str) or not valid_blueprint_identifier(target):
            problems.add(_join(pointer, "target"), "target must be a blueprint identifier")
        spec = agg.get("calculationSpec")
        if not isinstance(spec, dict) or spec.get("func") not in AGG_FUNCS:
            problems.add(
                _join(pointer, "calculationSpec"),
                f"calculationSpec.func must be one of {', '.join(sorted(AGG_FUNCS))}",
            )
        elif spec.get("calculationBy") == "property" and not isinstance(spec.get("property"), str):
            problems.add(_join(pointer, "calculationSpec", "property"), "property is required")
        elif spec.get("calculationBy") not in ("entities", "property"):
            problems.add(
                _join(pointer, "calculationSpec", "calculationBy"),
                "calculationBy must be 'entities' or 'property'",
            )


def check_ownership(ownership: Any, relations: dict[str, Any], problems: Problems) -> None:
    if ownership is None:
        return
    if not isinstance(ownership, dict) or ownership.get("type") not in ("Direct", "Inherited"):
        problems.add("/ownership/type", "ownership.type must be 'Direct' or 'Inherited'")
        return
    if ownership["type"] == "Inherited":
        path = ownership.get("path")
        if not isinstance(path, str) or not path:
            problems.add("/ownership/path", "Inherited ownership needs a relation path")
        elif path.split(".", 1)[0] not in relations:
            problems.add("/ownership/path", f"{path.split('.', 1)[0]!r} is not a relation")


def check_changelog_destination(dest: Any, problems: Problems) -> None:
    if dest is None or dest == {}:
        return
    if not isinstance(dest, dict) or dest.get("type") not in ("WEBHOOK", "KAFKA"):
        problems.add("/changelogDestination/type", "type must be 'WEBHOOK' or 'KAFKA'")
    elif dest["type"] == "WEBHOOK" and not (
        isinstance(dest.get("url"), str) and dest["url"].startswith(("http://", "https://"))
    ):
        problems.add("/changelogDestination/url", "a WEBHOOK destination needs an http(s) url")
