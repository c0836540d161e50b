"""Port's `{{ jq }}` templates: invocation payloads rendered against a run's trigger data.

A string that is exactly one template (`"{{ .inputs.count }}"`, whitespace around allowed)
becomes the jq result with its JSON type; a string mixing text and templates becomes a
string, each result interpolated (strings as they are, null as "", anything else as
compact JSON). jq's first output is the value; no output is null. Dict keys may be
templates too: a key that evaluates to null drops its pair, and the key
`"{{ spreadValue() }}"` merges its value (an object, or null for nothing) into the parent.
Other scalars pass through.

Templates run in the jq sandbox (app/kit/sandbox.py: confined children, a time limit, fair
turns across orgs), one call per render with every distinct expression of the value at
once. Errors are `TemplateError`s naming the JSON pointer of the value that failed; secret
values in jq's messages are masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import pydantic_core

from app.kit import sandbox

OUTPUT_LIMIT_BYTES = 1024 * 1024  # one template's result, as JSON

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_SPREAD = re.compile(r"\s*\{\{\s*spreadValue\(\)\s*\}\}\s*", re.S)
_SECRET = re.compile(
    r"""(?<![\w\])"?])\.secrets\s*\??\s*(?:
        \.\s*([A-Za-z_][A-Za-z0-9_]*)           # .secrets.NAME
      | \.?\s*\[\s*"((?:[^"\\]|\\.)*)"\s*\]     # .secrets["NAME"]
      | \.?\s*\[\s*'([^']*)'\s*\]               # .secrets['NAME']
      | \.\s*"((?:[^"\\]|\\.)*)"                # .secrets."NAME"
    )""",
    re.X,
)
MASK = "***"  # what readers see in place of a secret


class TemplateError(Exception):
    """A template that could not be rendered: where (a JSON pointer) and why."""

    def __init__(self, pointer: str, message: str) -> None:
        super().__init__(f"{pointer}: {message}" if pointer else message)
        self.pointer = pointer
        self.message = message


# ---------------------------------------------------------------------------------------
# Parsing


def _expressions(text: str) -> list[str]:
    return [match.group(1).strip() for match in _TEMPLATE.finditer(text)]


def _single(text: str) -> str | None:
    """The expression when the string is exactly one template (whitespace around)."""
    matches = list(_TEMPLATE.finditer(text))
    if len(matches) != 1:
        return None
    match = matches[0]
    if text[: match.start()].strip() or text[match.end() :].strip():
        return None
    return match.group(1).strip()


def _escape(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _collect(value: Any, pointer: str, found: dict[str, str]) -> None:
    """Every distinct expression of the value, with the pointer where it first appears."""
    if isinstance(value, str):
        for expression in _expressions(value):
            found.setdefault(expression, pointer)
    elif isinstance(value, dict):
        for key, item in value.items():
            at = f"{pointer}/{_escape(key)}"
            if isinstance(key, str) and not _SPREAD.fullmatch(key):
                for expression in _expressions(key):
                    found.setdefault(expression, at)
            _collect(item, at, found)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _collect(item, f"{pointer}/{index}", found)


def referenced_secrets(value: Any) -> set[str]:
    """The secret names the templates of a value read (`.secrets.NAME`, `.secrets["NAME"]`,
    `.secrets['NAME']`, `.secrets."NAME"`), so a run can fail before rendering when one is
    not defined."""
    found: dict[str, str] = {}
    _collect(value, "", found)
    names: set[str] = set()
    for expression in found:
        for match in _SECRET.finditer(expression):
            plain, double, single, quoted = match.groups()
            if plain is not None or single is not None:
                names.add(plain if plain is not None else single)
                continue
            raw = double if double is not None else quoted
            try:
                names.add(json.loads(f'"{raw}"'))
            except ValueError:
                names.add(raw)
    return names


def redact(text: str, secrets: Iterable[str]) -> str:
    """The text with every secret value masked, including the truncated forms jq prints
    in its error messages ("abcdefghij...")."""
    for secret in sorted((s for s in secrets if isinstance(s, str)), key=len, reverse=True):
        if len(secret) < 4:
            continue
        text = text.replace(secret, MASK)
        for end in range(len(secret) - 1, min(6, len(secret)) - 1, -1):
            text = text.replace(secret[:end] + "...", MASK + "...")
    return text


# ---------------------------------------------------------------------------------------
# Rendering


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Renderer:
    def __init__(self, results: dict[str, tuple[bool, Any]], secrets: list[str]) -> None:
        self.results = results
        self.secrets = secrets

    def result(self, expression: str, pointer: str) -> Any:
        ok, value = self.results[expression]
        if not ok:
            raise TemplateError(pointer, "jq error: " + redact(str(value), self.secrets))
        return value

    def string(self, text: str, pointer: str) -> Any:
        single = _single(text)
        if single is not None:
            return self.result(single, pointer)

        def interpolate(match: re.Match[str]) -> str:
            value = self.result(match.group(1).strip(), pointer)
            if value is None:
                return ""
            return value if isinstance(value, str) else _compact(value)

        return _TEMPLATE.sub(interpolate, text)

    def value(self, value: Any, pointer: str) -> Any:
        if isinstance(value, str):
            return self.string(value, pointer)
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                at = f"{pointer}/{_escape(key)}"
                if isinstance(key, str) and _SPREAD.fullmatch(key):
                    spread = self.value(item, at)
                    if spread is None:
                        continue
                    if not isinstance(spread, dict):
                        kind = type(spread).__name__
                        raise TemplateError(at, f"spreadValue() needs an object, not {kind}")
                    out.update(spread)
                    continue
                name = self.string(key, at) if isinstance(key, str) else key
                if name is None:
                    continue
                if isinstance(key, str) and not isinstance(name, str):
                    name = _compact(name)
                out[name] = self.value(item, at)
            return out
        if isinstance(value, list | tuple):
            return [self.value(item, f"{pointer}/{index}") for index, item in enumerate(value)]
        return value


async def render(value: Any, data: dict[str, Any], pointer: str = "", *, org: object) -> Any:
    """The value with its templates evaluated against `data` for the organization `org`;
    `pointer` prefixes the JSON pointers of errors (e.g. "/body"). Raises TemplateError, or
    sandbox.Busy when no evaluation turn came in time."""
    found: dict[str, str] = {}
    _collect(value, pointer, found)
    raw_secrets = data.get("secrets")
    secrets = (
        [v for v in raw_secrets.values() if isinstance(v, str)]
        if isinstance(raw_secrets, dict)
        else []
    )
    results: dict[str, tuple[bool, Any]] = {}
    expressions = [e for e in found if e]
    for expression, at in found.items():
        if not expression:
            raise TemplateError(at, "jq error: the template is empty")
    if expressions:
        try:
            document = pydantic_core.to_json(data).decode()
        except pydantic_core.PydanticSerializationError as exc:
            raise TemplateError(pointer, f"the template data is not JSON: {exc}") from exc
        at = found[expressions[0]] if len(expressions) == 1 else pointer
        try:
            (row,) = await sandbox.evaluate(
                org, expressions, [document], outputs=1, output_limit=OUTPUT_LIMIT_BYTES
            )
        except sandbox.TimeLimit as exc:
            limit = sandbox.limits().time_limit
            raise TemplateError(at, f"jq error: evaluation ran longer than {limit:g} s") from exc
        except sandbox.Crashed as exc:
            raise TemplateError(
                at, "jq error: evaluation stopped (out of memory or a crash)"
            ) from exc
        # The first output is the value (none is null); a failure keeps jq's message.
        answers = [(ok, (outs[0] if outs else None) if ok else outs) for ok, outs in row]
        results = dict(zip(expressions, answers, strict=True))
    return _Renderer(results, secrets).value(value, pointer)
