"""Backstage Scaffolder expressions (`${{ ... }}`, Nunjucks) turned into the jq of Portolan's
`{{ ... }}` templates, for the subset templates use: paths into `parameters`,
`steps.<id>.output`, `secrets`, `context.task.id` and `user.entity.spec.profile.email`;
string, number and boolean literals; `==`, `!=`, `<`, `>`, `<=`, `>=`, `+`, `!` / `not`,
`&&` / `and`, `||` / `or` (with JavaScript's truthiness), the inline `a if c else b`; the
filters listed in FILTERS. Anything else raises Untranslatable, naming what could not be
carried over, so a template is never imported with a value that would silently differ."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>\d+(?:\.\d+)?)
      | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>===|!==|==|!=|<=|>=|&&|\|\||[()\[\].,|!<>+])
      | (?P<name>[A-Za-z_$][A-Za-z0-9_$-]*)
    )""",
    re.X,
)
# JavaScript's truthiness (Nunjucks runs on it): null, false, "", 0 are false.
_TRUTHY = '(. != null and . != false and . != "" and . != 0)'
# RepoUrlPicker's value, `github.com?owner=acme&repo=web`, as parseRepoUrl gives it.
_PARSE_REPO_URL = (
    '(split("?") as $p | {host: $p[0]} + ($p[1] // "" | split("&") | map(select(. != "") '
    '| split("=") | {(.[0]): (.[1:] | join("="))}) | add // {}))'
)


class Untranslatable(ValueError):
    """An expression (or part of one) with no jq counterpart here."""


@dataclass(slots=True)
class Context:
    """What an expression may name: the steps before it (their ids), and whether secrets
    may be read (a WEBHOOK request's templates only). Collects the step outputs read."""

    earlier_steps: set[str]
    secrets: bool
    outputs_read: dict[str, set[str]] = field(default_factory=dict)


def _literal(text: str) -> str:
    """A Nunjucks string literal as a jq (JSON) string."""
    quote, body = text[0], text[1:-1]
    value = re.sub(r"\\(.)", lambda m: m.group(1), body) if quote == "'" else json.loads(text)
    return json.dumps(value)


def _is_literal(jq: str) -> bool:
    try:
        json.loads(jq)
    except ValueError:
        return False
    return True


def _regex_escape(text: str) -> str:
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


def _filter_replace(args: list[str]) -> str:
    if len(args) != 2:
        raise Untranslatable("replace takes two arguments")
    try:
        needle = json.loads(args[0])
    except ValueError as exc:
        raise Untranslatable("replace's first argument must be a string literal") from exc
    if not isinstance(needle, str):
        raise Untranslatable("replace's first argument must be a string literal")
    return f"gsub({json.dumps(_regex_escape(needle))}; {args[1]})"


def _filter_pick(args: list[str]) -> str:
    if len(args) != 1:
        raise Untranslatable("pick takes one argument")
    return f".[{args[0]}]"


def _no_args(jq: str) -> Callable[[list[str]], str]:
    def make(args: list[str]) -> str:
        if args:
            raise Untranslatable("this filter takes no argument")
        return jq

    return make


def _one_arg(template: str) -> Callable[[list[str]], str]:
    def make(args: list[str]) -> str:
        if len(args) != 1:
            raise Untranslatable("this filter takes one argument")
        return template.format(args[0])

    return make


FILTERS: dict[str, Callable[[list[str]], str]] = {
    "lower": _no_args("ascii_downcase"),
    "upper": _no_args("ascii_upcase"),
    "trim": _no_args('sub("^\\\\s+"; "") | sub("\\\\s+$"; "")'),
    "capitalize": _no_args("(.[0:1] | ascii_upcase) + (.[1:] | ascii_downcase)"),
    "length": _no_args("length"),
    "first": _no_args(".[0]"),
    "last": _no_args(".[-1]"),
    "dump": _no_args("tojson"),
    "string": _no_args("tostring"),
    "int": _no_args("tonumber | floor"),
    "join": _one_arg("join({0})"),
    "default": _one_arg(f"if {_TRUTHY} then . else {{0}} end"),
    "replace": _filter_replace,
    "pick": _filter_pick,
    "parseRepoUrl": _no_args(_PARSE_REPO_URL),
    "projectSlug": _no_args(f'{_PARSE_REPO_URL} | .owner + "/" + .repo'),
}


class _Parser:
    def __init__(self, text: str, context: Context) -> None:
        self.text = text
        self.context = context
        self.tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(text):
            if not text[position:].strip():
                break
            match = _TOKEN.match(text, position)
            if match is None or match.end() == position:
                raise Untranslatable(f"cannot read {text[position:].strip()[:30]!r}")
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.at = 0

    # -- tokens --------------------------------------------------------------------------

    def peek(self, offset: int = 0) -> tuple[str, str]:
        index = self.at + offset
        return self.tokens[index] if index < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        self.at += 1
        return token

    def accept(self, *values: str) -> str | None:
        kind, value = self.peek()
        if kind in ("op", "name") and value in values:
            self.at += 1
            return value
        return None

    def expect(self, value: str) -> None:
        if self.accept(value) is None:
            raise Untranslatable(f"expected {value!r} in {self.text.strip()!r}")

    # -- grammar -------------------------------------------------------------------------

    def parse(self) -> str:
        result = self.inline_if()
        if self.peek()[0] != "end":
            raise Untranslatable(f"cannot read {self.peek()[1]!r} in {self.text.strip()!r}")
        return result

    def inline_if(self) -> str:
        value = self.or_()
        if self.accept("if") is None:
            return value
        test = self.or_()
        otherwise = self.or_() if self.accept("else") is not None else "null"
        return f"(if ({test}) | {_TRUTHY} then {value} else {otherwise} end)"

    def or_(self) -> str:
        left = self.and_()
        while self.accept("||", "or") is not None:
            right = self.and_()
            left = f"(({left}) as $l | if $l | {_TRUTHY} then $l else {right} end)"
        return left

    def and_(self) -> str:
        left = self.not_()
        while self.accept("&&", "and") is not None:
            right = self.not_()
            left = f"(({left}) as $l | if $l | {_TRUTHY} then {right} else $l end)"
        return left

    def not_(self) -> str:
        if self.accept("!", "not") is not None:
            return f"(({self.not_()}) | {_TRUTHY} | not)"
        return self.compare()

    def compare(self) -> str:
        left = self.sum_()
        op = self.accept("===", "!==", "==", "!=", "<=", ">=", "<", ">")
        if op is None:
            return left
        right = self.sum_()
        jq_op = {"===": "==", "!==": "!="}.get(op, op)
        return f"(({left}) {jq_op} ({right}))"

    def sum_(self) -> str:
        left = self.filtered()
        while self.accept("+") is not None:
            left = f"(({left}) + ({self.filtered()}))"
        return left

    def filtered(self) -> str:
        value = self.primary()
        while self.peek() == ("op", "|"):
            self.take()
            kind, name = self.take()
            if kind != "name":
                raise Untranslatable(f"a filter name is expected after | in {self.text.strip()!r}")
            args: list[str] = []
            if self.accept("(") is not None:
                if self.accept(")") is None:
                    args.append(self.inline_if())
                    while self.accept(",") is not None:
                        args.append(self.inline_if())
                    self.expect(")")
            make = FILTERS.get(name)
            if make is None:
                raise Untranslatable(f"the filter {name!r} has no jq counterpart here")
            # Arguments other than literals are read from the run's data, not from the value
            # being filtered: they are bound first.
            bound: list[str] = []
            names: list[str] = []
            for index, arg in enumerate(args):
                if _is_literal(arg):
                    names.append(arg)
                else:
                    var = f"$a{self.at}_{index}"
                    bound.append(f"({arg}) as {var} | ")
                    names.append(var)
            try:
                value = f"({''.join(bound)}({value}) | {make(names)})"
            except Untranslatable as exc:
                raise Untranslatable(f"{name}: {exc}") from exc
        return value

    def primary(self) -> str:
        kind, value = self.take()
        if kind == "number":
            return value
        if kind == "string":
            return _literal(value)
        if kind == "op" and value == "(":
            inner = self.inline_if()
            self.expect(")")
            return f"({inner})"
        if kind == "name":
            if value in ("true", "false"):
                return value
            if value in ("null", "none", "undefined"):
                return "null"
            return self.path(value)
        raise Untranslatable(f"unexpected {value or 'end'!r} in {self.text.strip()!r}")

    def segments(self) -> list[str | int]:
        """`.name`, `['name']`, `[0]` after a root, as keys."""
        found: list[str | int] = []
        while True:
            if self.accept(".") is not None:
                kind, value = self.take()
                if kind != "name":
                    raise Untranslatable(f"a name is expected after . in {self.text.strip()!r}")
                found.append(value)
            elif self.peek() == ("op", "["):
                self.take()
                kind, value = self.take()
                if kind == "string":
                    found.append(json.loads(_literal(value)))
                elif kind == "number" and value.isdigit():
                    found.append(int(value))
                else:
                    raise Untranslatable(
                        f"only literal keys are read inside [] in {self.text.strip()!r}"
                    )
                self.expect("]")
            else:
                return found

    def path(self, root: str) -> str:
        parts = self.segments()
        if root == "parameters":
            return ".outputs.trigger" + keys(parts)
        if root == "steps":
            if len(parts) < 2 or parts[1] != "output" or not isinstance(parts[0], str):
                raise Untranslatable("steps are read as steps.<id>.output.<name>")
            step = parts[0]
            if step not in self.context.earlier_steps:
                raise Untranslatable(f"step {step!r} does not run before this one")
            if len(parts) < 3 or not isinstance(parts[2], str):
                raise Untranslatable(f"the whole output of step {step!r} is read: name a field")
            self.context.outputs_read.setdefault(step, set()).add(parts[2])
            return f".outputs[{json.dumps(step)}]" + keys(parts[2:])
        if root == "secrets":
            if not self.context.secrets:
                raise Untranslatable("secrets are read in a step's input only")
            if len(parts) != 1 or not isinstance(parts[0], str):
                raise Untranslatable("a secret is read as secrets.<name>")
            return f".secrets[{json.dumps(parts[0])}]"
        if root == "context" and parts == ["task", "id"]:
            return ".workflowRun.identifier"
        if root == "user" and parts == ["entity", "spec", "profile", "email"]:
            return ".workflowRun.trigger.by.email"  # who started the run
        where = ".".join([root, *map(str, parts)])
        raise Untranslatable(f"{where} has no counterpart in a Portolan workflow run")


def keys(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def expression(text: str, context: Context) -> str:
    """One expression's body (what is inside `${{ }}`) as jq."""
    if not text.strip():
        raise Untranslatable("an empty expression")
    return _Parser(text, context).parse()


def condition(value: Any, context: Context) -> str:
    """A step's `if` (an expression, or a literal) as a jq condition that is true when the
    step runs (JavaScript's truthiness of the value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        raise Untranslatable("if is an expression or a boolean")
    match = _EXPRESSION.fullmatch(value.strip())
    if match is None:
        if "${{" in value:
            raise Untranslatable("if holds text around its expression")
        return "true" if value.strip() else "false"  # a non-empty string is truthy
    return f"(({expression(match.group(1), context)}) | {_TRUTHY})"


def template(value: Any, context: Context) -> Any:
    """A step's input (any JSON value, keys included) with every `${{ }}` turned into a
    Portolan `{{ }}` template: a string that is one expression keeps the value's type, as in
    Backstage; text around expressions is interpolated."""
    if isinstance(value, str):
        if "{{" in _EXPRESSION.sub("", value):
            raise Untranslatable(
                f"{value[:60]!r} holds '{{{{' outside ${{{{ }}}}, which Portolan would read as jq"
            )
        return _EXPRESSION.sub(lambda m: "{{ " + expression(m.group(1), context) + " }}", value)
    if isinstance(value, dict):
        return {template(str(k), context): template(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [template(v, context) for v in value]
    return value
