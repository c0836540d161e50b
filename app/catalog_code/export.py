"""`portolan export`: an organization's blueprints, scorecards, actions and workflows as
files in the layout `portolan apply` reads, without server-owned fields, in a stable form
(sorted keys, the server's order of lists), so applying an export changes nothing.

Layout: `blueprints/<id>.yaml`, `scorecards/<blueprint>/<id>.yaml` (with `blueprint`),
`actions/<id>.yaml`, `workflows/<id>.yaml`. Catalog files already in those directories that
the export did not write are removed, so the directory mirrors the organization; other files
stay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.catalog_code.loader import EXTENSIONS, safe_name
from app.catalog_code.plan import ServerState, fetch_state
from app.remote import Client


@dataclass(frozen=True, slots=True)
class Exported:
    organization: dict[str, Any]
    written: list[Path]
    removed: list[Path]


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not value.startswith(" ") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(value: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return yaml.dump(
        value,
        Dumper=_Dumper,
        sort_keys=True,
        allow_unicode=True,
        default_flow_style=False,
        width=100,
    )


def file_name(identifier: str, taken: set[str], suffix: str) -> str:
    """A file name for an identifier: unsafe characters become `_`, and a clash gets a
    number (the identifier inside the file is what counts)."""
    stem = safe_name(identifier)
    name, n = f"{stem}{suffix}", 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}-{n}{suffix}"
    taken.add(name.lower())
    return name


def files_of(state: ServerState, fmt: str) -> dict[Path, str]:
    suffix = ".json" if fmt == "json" else ".yaml"
    out: dict[Path, str] = {}
    taken: dict[Path, set[str]] = {}
    for (kind, blueprint, identifier), definition in sorted(state.objects.items()):
        if kind == "scorecard":
            folder = Path("scorecards") / safe_name(blueprint)
            body = {**definition, "blueprint": blueprint}
        else:
            folder = Path(f"{kind}s")
            body = definition
        name = file_name(identifier, taken.setdefault(folder, set()), suffix)
        out[folder / name] = render(body, fmt)
    return out


def export(client: Client, directory: Path, *, fmt: str = "yaml") -> Exported:
    state = fetch_state(client)
    files = files_of(state, fmt)
    written: list[Path] = []
    for relative, text in files.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    keep = {p.resolve() for p in written}
    removed: list[Path] = []
    for folder in ("blueprints", "scorecards", "actions", "workflows"):
        root = directory / folder
        if not root.is_dir():
            continue
        for stale in sorted(root.rglob("*")):
            if stale.is_file() and stale.suffix.lower() in EXTENSIONS:
                if stale.resolve() not in keep:
                    stale.unlink()
                    removed.append(stale)
    return Exported(organization=state.organization, written=written, removed=removed)
