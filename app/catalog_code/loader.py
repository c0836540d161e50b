"""Reads catalog files (blueprints, scorecards, actions and workflows in Port's shapes, as
JSON or YAML) into documents that know what they are and where they came from (file and
line).

A document's kind is its `kind` key (`blueprint`, `scorecard`, `action`, `workflow`; taken
out of the body), else the nearest enclosing directory named `blueprints/`, `scorecards/`,
`actions/` or `workflows/`. A scorecard's blueprint is its `blueprint` key, else the
directory it sits in under `scorecards/` (`scorecards/<blueprint>/<scorecard>.yaml`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = ("blueprint", "scorecard", "action", "workflow")
DIRECTORIES = {
    "blueprints": "blueprint",
    "scorecards": "scorecard",
    "actions": "action",
    "workflows": "workflow",
}
EXTENSIONS = (".yaml", ".yml", ".json")
_UNSAFE = re.compile(r"[^A-Za-z0-9@_.+=-]")


@dataclass(frozen=True, slots=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(slots=True)
class Document:
    kind: str
    identifier: str
    body: dict[str, Any]
    path: Path
    line: int
    blueprint: str | None = None  # a scorecard's blueprint
    lines: dict[str, int] = field(default_factory=dict)  # JSON pointer -> line

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.blueprint or "", self.identifier)

    @property
    def label(self) -> str:
        return label_of(self.kind, self.identifier, self.blueprint)

    def where(self, pointer: str = "") -> str:
        """`file:line` of the deepest part of `pointer` the file has a line for."""
        probe = pointer
        while probe:
            if probe in self.lines:
                return f"{self.path}:{self.lines[probe]}"
            probe = probe.rsplit("/", 1)[0]
        return f"{self.path}:{self.line}"


def safe_name(identifier: str) -> str:
    """An identifier as a file or directory name: characters outside @_.+=- and
    alphanumerics become `_`."""
    return _UNSAFE.sub("_", identifier).lstrip(".") or "_"


def label_of(kind: str, identifier: str, blueprint: str | None = None) -> str:
    return f"{kind} {blueprint}/{identifier}" if kind == "scorecard" else f"{kind} {identifier}"


class _Loader(yaml.SafeLoader):
    """YAML as JSON sees it: timestamps stay strings, only true/false are booleans (Port's
    enums hold values like `on`, `off`, `yes`, `no`)."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def catalog_files(paths: Iterable[Path]) -> tuple[list[Path], list[Problem]]:
    """The files to read: each file given, and every JSON/YAML file under each directory
    given (recursively, hidden entries skipped), in a stable order."""
    files: list[Path] = []
    problems: list[Problem] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                problems.append(Problem(str(path), "not a .yaml, .yml or .json file"))
            else:
                files.append(path)
        else:
            problems.append(Problem(str(path), "no such file or directory"))
    unique: list[Path] = []
    seen: set[Path] = set()
    for f in files:
        resolved = f.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(f)
    return unique, problems


def load(paths: Iterable[Path]) -> tuple[list[Document], list[Problem]]:
    files, problems = catalog_files(paths)
    documents: list[Document] = []
    for path in files:
        for item in _read(path, problems):
            doc = _document(path, *item, problems)
            if doc is not None:
                documents.append(doc)
    return documents, problems


def _read(path: Path, problems: list[Problem]) -> Iterator[tuple[Any, int, dict[str, int]]]:
    """(value, line, pointer lines) for each object of a file: one per YAML document, or
    per item when a document (or a JSON file) is a list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), f"cannot read: {exc}"))
        return
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"{path}:{exc.lineno}", f"invalid JSON: {exc.msg}"))
            return
        yield from _split(value, _json_lines(text), problems, path)
        return
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            lines: dict[str, int] = {}
            duplicates: list[Problem] = []
            _walk(node, "", lines, duplicates, path)
            problems.extend(duplicates)
            value = loader.construct_document(node)
            if value is None:
                continue
            yield from _split(value, lines, problems, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(exc, "problem", None) or str(exc)
        problems.append(Problem(where, f"invalid YAML: {reason}"))
    finally:
        loader.dispose()


def _json_lines(text: str) -> dict[str, int]:
    """Lines of a JSON text's parts, read through the YAML composer (JSON is YAML); none
    when it cannot read it."""
    loader = _Loader(text)
    lines: dict[str, int] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            _walk(node, "", lines, [], Path())
    except yaml.YAMLError:
        return {}
    finally:
        loader.dispose()
    return lines


def _walk(
    node: yaml.Node, pointer: str, lines: dict[str, int], problems: list[Problem], path: Path
) -> None:
    lines[pointer] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            child = f"{pointer}/{_escape(name)}"
            if name in seen:
                problems.append(
                    Problem(f"{path}:{key.start_mark.line + 1}", f"duplicate key {name!r}")
                )
            seen.add(name)
            _walk(value, child, lines, problems, path)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            _walk(value, f"{pointer}/{index}", lines, problems, path)


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _split(
    value: Any, lines: dict[str, int], problems: list[Problem], path: Path
) -> Iterator[tuple[Any, int, dict[str, int]]]:
    if isinstance(value, list):
        for index, item in enumerate(value):
            prefix = f"/{index}"
            own = {
                pointer[len(prefix) :]: line
                for pointer, line in lines.items()
                if pointer == prefix or pointer.startswith(prefix + "/")
            }
            yield item, own.get("", lines.get("", 1)), own
    else:
        yield value, lines.get("", 1), lines


def _document(
    path: Path, value: Any, line: int, lines: dict[str, int], problems: list[Problem]
) -> Document | None:
    where = f"{path}:{line}"
    if not isinstance(value, dict):
        problems.append(
            Problem(where, "expected an object (a blueprint, scorecard, action or workflow)")
        )
        return None
    body = dict(value)
    kind = body.pop("kind", None)
    if kind is None:
        kind = _kind_from_directory(path)
        if kind is None:
            problems.append(
                Problem(
                    where,
                    "cannot tell what this is: add `kind: blueprint | scorecard | action | "
                    "workflow`, or put the file under blueprints/, scorecards/, actions/ or "
                    "workflows/",
                )
            )
            return None
    elif kind not in KINDS:
        problems.append(
            Problem(f"{path}:{lines.get('/kind', line)}", f"unknown kind {kind!r} ({_kinds()})")
        )
        return None
    identifier = body.get("identifier")
    if not isinstance(identifier, str) or not identifier:
        problems.append(Problem(where, f"a {kind} needs an `identifier` (a string)"))
        return None
    blueprint: str | None = None
    if kind == "scorecard":
        stated = body.pop("blueprint", None)
        from_dir = path.parent.name if path.parent.parent.name == "scorecards" else None
        if stated is not None and not isinstance(stated, str):
            problems.append(Problem(where, "`blueprint` must be a blueprint identifier"))
            return None
        if stated is not None and from_dir is not None and safe_name(stated) != from_dir:
            problems.append(
                Problem(
                    f"{path}:{lines.get('/blueprint', line)}",
                    f"the scorecard says blueprint {stated!r} but sits in scorecards/{from_dir}/",
                )
            )
            return None
        blueprint = stated or from_dir
        if blueprint is None:
            problems.append(
                Problem(
                    where,
                    "a scorecard names its blueprint: `blueprint: <identifier>`, or put it "
                    "under scorecards/<blueprint>/",
                )
            )
            return None
    return Document(
        kind=kind,
        identifier=identifier,
        body=body,
        path=path,
        line=line,
        blueprint=blueprint,
        lines=lines,
    )


def _kinds() -> str:
    return "expected one of " + ", ".join(KINDS)


def _kind_from_directory(path: Path) -> str | None:
    for parent in path.resolve().parents:
        if parent.name in DIRECTORIES:
            return DIRECTORIES[parent.name]
    return None
