"""Reads Backstage catalog files: YAML files and directories (recursively), several documents
per file, Location targets that are local files followed. Anything unreadable becomes a
Problem naming the file and the document."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

API_VERSIONS = ("backstage.io/v1alpha1", "backstage.io/v1beta1")
YAML_SUFFIXES = (".yaml", ".yml")
_CATALOG_API_VERSION = re.compile(r"(^|\.)backstage\.io/")
# A YAML file that does not parse is still reported when it looks like a catalog file.
_CATALOG_TEXT = re.compile(r"^apiVersion:\s*['\"]?([\w.-]+\.)?backstage\.io/", re.M)


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the import could not carry over. `document` counts from 1 within `file`
    (0: the file as a whole, or nothing in particular)."""

    code: str
    message: str
    file: str = ""
    document: int = 0
    ref: str = ""

    def where(self) -> str:
        if not self.file:
            return ""
        return f"{self.file}#{self.document}" if self.document else self.file

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "file": self.file,
            "document": self.document,
            "ref": self.ref,
        }


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document with a mapping at its top."""

    file: str
    index: int
    path: Path
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind") or "")


@dataclass(slots=True)
class Reading:
    documents: list[Document] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    # YAML files found in a directory that hold no catalog document (an OpenAPI definition
    # beside its API, CI files ...): not read, counted
    ignored: int = 0


def _display(path: Path) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path.resolve()) if relative.startswith("..") else relative


def _is_skeleton(name: str) -> bool:
    """A file or folder name holding a template expression (`${{ values.name }}`): part of
    a Scaffolder Template's skeleton, which fetch:template renders; not a catalog file."""
    return "${{" in name


def _expand(path: Path, reading: Reading) -> list[tuple[Path, bool]]:
    """The YAML files a path stands for, each with whether it was found by searching a
    directory (then it is read only if it holds catalog documents). Skeleton folders and
    files inside a directory are skipped, one report line each."""
    if not path.is_dir():
        return [(path, False)]
    found: list[tuple[Path, bool]] = []
    skipped: list[Path] = []
    for p in sorted(path.rglob("*")):
        relative = p.relative_to(path).parts
        if any(_is_skeleton(part) for part in relative):
            top = path.joinpath(
                *relative[: next(i for i, x in enumerate(relative) if "${{" in x) + 1]
            )
            if top not in skipped:
                skipped.append(top)
            continue
        if p.is_file() and p.suffix.lower() in YAML_SUFFIXES:
            found.append((p, True))
    for top in skipped:
        reading.problems.append(
            Problem(
                "skeleton",
                "a Template skeleton's "
                + ("folder" if top.is_dir() else "file")
                + " (its name holds a template expression): not a catalog document, not read",
                _display(top),
            )
        )
    return found


def read(paths: list[Path]) -> Reading:
    """Every document of every file given (directories searched for *.yaml / *.yml), in
    order, each file once even when reached twice (directly and through a Location)."""
    reading = Reading()
    seen: set[Path] = set()
    queue: list[tuple[Path, bool]] = []
    for given in paths:
        if not given.exists():
            reading.problems.append(
                Problem("unreadable", "no such file or directory", _display(given))
            )
            continue
        queue.extend(_expand(given, reading))
    while queue:
        path, searched = queue.pop(0)
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        followed = _read_file(path, reading, searched)
        queue.extend(p for p in followed if p[0].resolve() not in seen)
    return reading


def is_catalog_document(raw: Any) -> bool:
    """A mapping with a catalog apiVersion (`backstage.io/...`,
    `scaffolder.backstage.io/...`) and a kind."""
    if not isinstance(raw, dict):
        return False
    api_version, kind = raw.get("apiVersion"), raw.get("kind")
    return (
        isinstance(api_version, str)
        and bool(_CATALOG_API_VERSION.search(api_version))
        and isinstance(kind, str)
    )


def _read_file(path: Path, reading: Reading, searched: bool = False) -> list[tuple[Path, bool]]:
    """Adds the file's documents; returns the files its Locations point at. A file found by
    searching a directory is read only when it holds a catalog document (one named on the
    command line or by a Location is read whatever it holds, and its problems reported)."""
    name = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw_documents = list(yaml.safe_load_all(text))
    except (OSError, UnicodeDecodeError) as exc:
        if searched and not _CATALOG_TEXT.search(_head(path)):
            reading.ignored += 1
            return []
        reading.problems.append(Problem("unreadable", f"cannot read: {exc}", name))
        return []
    except yaml.YAMLError as exc:
        if searched and not _CATALOG_TEXT.search(text):
            reading.ignored += 1
            return []
        reading.problems.append(Problem("invalid-yaml", f"not valid YAML: {exc}", name))
        return []
    if searched and not any(is_catalog_document(raw) for raw in raw_documents):
        reading.ignored += 1
        return []
    reading.files += 1
    followed: list[tuple[Path, bool]] = []
    for index, raw in enumerate(raw_documents, start=1):
        if raw is None:
            continue
        if not isinstance(raw, dict):
            reading.problems.append(
                Problem("invalid-document", "a catalog document must be a mapping", name, index)
            )
            continue
        document = Document(name, index, path, raw)
        reading.documents.append(document)
        if document.kind == "Location":
            followed.extend(_location_targets(document, reading))
    return followed


def _head(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return f.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        return ""


def _location_targets(document: Document, reading: Reading) -> list[tuple[Path, bool]]:
    spec = document.body.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    targets: list[Any] = []
    if spec.get("target") is not None:
        targets.append(spec["target"])
    if isinstance(spec.get("targets"), list):
        targets.extend(spec["targets"])
    base = document.path.parent
    found: list[tuple[Path, bool]] = []
    for target in targets:
        if not isinstance(target, str) or not target.strip():
            continue
        if "://" in target:
            reading.problems.append(
                Problem(
                    "location-not-followed",
                    f"Location target {target!r} is not a local file: not read",
                    document.file,
                    document.index,
                )
            )
            continue
        candidates = _local_target(base, target, reading)
        if not candidates:
            reading.problems.append(
                Problem(
                    "location-not-followed",
                    f"Location target {target!r} matches no file",
                    document.file,
                    document.index,
                )
            )
        found.extend(candidates)
    return found


def _local_target(base: Path, target: str, reading: Reading) -> list[tuple[Path, bool]]:
    target_path = Path(target)
    if any(ch in target for ch in "*?["):
        root = Path(target_path.anchor) if target_path.is_absolute() else base
        pattern = str(target_path.relative_to(target_path.anchor)) if target_path.anchor else target
        return [
            (p, False)
            for p in sorted(root.glob(pattern))
            if p.is_file() and not any(_is_skeleton(part) for part in p.relative_to(root).parts)
        ]
    path = target_path if target_path.is_absolute() else base / target_path
    return _expand(path, reading) if path.exists() else []
