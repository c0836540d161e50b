"""Reads Backstage catalog files: YAML files and directories (recursively), several documents
per file, Location targets that are local files followed. Anything unreadable becomes a
Problem naming the file and the document."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

API_VERSIONS = ("backstage.io/v1alpha1", "backstage.io/v1beta1")
YAML_SUFFIXES = (".yaml", ".yml")


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


def _display(path: Path) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path.resolve()) if relative.startswith("..") else relative


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in YAML_SUFFIXES
        )
    return [path]


def read(paths: list[Path]) -> Reading:
    """Every document of every file given (directories searched for *.yaml / *.yml), in
    order, each file once even when reached twice (directly and through a Location)."""
    reading = Reading()
    seen: set[Path] = set()
    queue: list[Path] = []
    for given in paths:
        if not given.exists():
            reading.problems.append(
                Problem("unreadable", "no such file or directory", _display(given))
            )
            continue
        queue.extend(_expand(given))
    while queue:
        path = queue.pop(0)
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        followed = _read_file(path, reading)
        queue.extend(p for p in followed if p.resolve() not in seen)
    return reading


def _read_file(path: Path, reading: Reading) -> list[Path]:
    """Adds the file's documents; returns the files its Locations point at."""
    name = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw_documents = list(yaml.safe_load_all(text))
    except (OSError, UnicodeDecodeError) as exc:
        reading.problems.append(Problem("unreadable", f"cannot read: {exc}", name))
        return []
    except yaml.YAMLError as exc:
        reading.problems.append(Problem("invalid-yaml", f"not valid YAML: {exc}", name))
        return []
    reading.files += 1
    followed: list[Path] = []
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


def _location_targets(document: Document, reading: Reading) -> list[Path]:
    spec = document.body.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    targets: list[Any] = []
    if spec.get("target") is not None:
        targets.append(spec["target"])
    if isinstance(spec.get("targets"), list):
        targets.extend(spec["targets"])
    base = document.path.parent
    found: list[Path] = []
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
        candidates = _local_target(base, target)
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


def _local_target(base: Path, target: str) -> list[Path]:
    target_path = Path(target)
    if any(ch in target for ch in "*?["):
        root = Path(target_path.anchor) if target_path.is_absolute() else base
        pattern = str(target_path.relative_to(target_path.anchor)) if target_path.anchor else target
        return sorted(p for p in root.glob(pattern) if p.is_file())
    path = target_path if target_path.is_absolute() else base / target_path
    return _expand(path) if path.exists() else []
