"""Plans a Backstage import against what the server holds (blueprints, entities, teams,
users), then writes it through the API: blueprints, teams, users, entities (targets before the
entities that point at them), and reports what changed and what could not be carried over."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.backstage.mapping import (
    BLUEPRINTS,
    WRITE_ORDER,
    Catalog,
    Link,
    MappedEntity,
    Origin,
    Ref,
    RelationSpec,
    map_documents,
    parse_ref,
    self_ref,
)
from app.backstage.reader import Document, Problem, read
from app.backstage.scaffolder import MappedTemplate, map_template, template_of
from app.remote import ApiError, Client

BULK_LIMIT = 1000
PRUNE_LIMIT = 100  # entities per bulk delete
_BULK_PARAMS = {"upsert": "true", "merge": "true"}


@dataclass(slots=True)
class Counts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "failed": self.failed,
        }


@dataclass(slots=True)
class Report:
    dry_run: bool
    files: int = 0
    documents: int = 0
    ignored: int = 0  # YAML files found in directories that hold no catalog document
    blueprints: dict[str, str] = field(default_factory=dict)  # created / extended / unchanged
    entities: dict[str, Counts] = field(default_factory=dict)
    teams: Counts = field(default_factory=Counts)
    users: Counts = field(default_factory=Counts)
    workflows: Counts = field(default_factory=Counts)
    templates: list[TemplateLine] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)  # with --prune: what was deleted
    problems: list[Problem] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    imported_anything: bool = False

    @property
    def exit_code(self) -> int:
        """1 when nothing was importable or the API refused something; skipped items alone
        (the problems) do not fail the import."""
        return 1 if self.errors or not self.imported_anything else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dryRun": self.dry_run,
            "files": self.files,
            "documents": self.documents,
            "ignored": self.ignored,
            "blueprints": self.blueprints,
            "entities": {bp: c.as_dict() for bp, c in self.entities.items()},
            "teams": self.teams.as_dict(),
            "users": self.users.as_dict(),
            "workflows": self.workflows.as_dict(),
            "templates": [t.as_dict() for t in self.templates],
            "pruned": self.pruned,
            "problems": [p.as_dict() for p in self.problems],
            "errors": self.errors,
        }

    def render(self) -> str:
        verb = "would be " if self.dry_run else ""
        lines = [
            f"Read {self.files} file(s), {self.documents} document(s)"
            + (" (dry run: nothing written)" if self.dry_run else "")
        ]
        if self.ignored:
            lines.append(f"Ignored {self.ignored} YAML file(s) holding no catalog document")
        if self.blueprints:
            lines.append("Blueprints:")
            lines.extend(f"  {bp:<12} {verb}{status}" for bp, status in self.blueprints.items())
        if self.entities:
            lines.append(f"Entities ({verb}created / updated / unchanged / failed):")
            lines.extend(
                f"  {bp:<12} {c.created} / {c.updated} / {c.unchanged} / {c.failed}"
                for bp, c in self.entities.items()
            )
        lines.append(f"Teams ({verb}created / updated / unchanged / failed): {_counts(self.teams)}")
        lines.append(f"Users ({verb}invited / updated / unchanged / failed): {_counts(self.users)}")
        if self.templates:
            lines.append(
                f"Workflows ({verb}created / updated / unchanged / failed): "
                f"{_counts(self.workflows)}"
            )
            lines.append("Templates:")
            for t in self.templates:
                lines.append(f"  {t.ref} -> workflow {t.workflow}: {verb}{t.status}")
                lines.extend(f"    input {line}" for line in t.inputs)
                lines.extend(f"    step {s.step} ({s.action}): {s.became}" for s in t.steps)
        if self.pruned:
            lines.append(f"Pruned ({verb}deleted: no longer in the files) ({len(self.pruned)}):")
            lines.extend(f"  {p}" for p in self.pruned)
        if self.problems:
            lines.append(f"Not imported ({len(self.problems)}):")
            for p in self.problems:
                parts = [p.where(), f"[{p.code}]", f"{p.ref}:" if p.ref else "", p.message]
                lines.append("  " + " ".join(part for part in parts if part))
        if self.errors:
            lines.append(f"API errors ({len(self.errors)}):")
            lines.extend(f"  {e}" for e in self.errors)
        if not self.imported_anything:
            lines.append("Nothing to import.")
        return "\n".join(lines)


@dataclass(slots=True)
class TemplateLine:
    """A Template and the workflow it became: created / updated / unchanged / failed, or
    skipped (the problems say why), with what each input and step became."""

    ref: str
    file: str
    document: int
    workflow: str
    status: str
    inputs: list[str]
    steps: list[Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "file": self.file,
            "document": self.document,
            "workflow": self.workflow,
            "status": self.status,
            "inputs": self.inputs,
            "steps": [s.as_dict() for s in self.steps],
        }


def _counts(c: Counts) -> str:
    return f"{c.created} / {c.updated} / {c.unchanged} / {c.failed}"


# ------------------------------------------------------------------------------------------
# Plan


@dataclass(slots=True)
class BlueprintPlan:
    identifier: str
    exists: bool
    definition: dict[str, Any] | None  # the server's, when it exists
    properties: set[str] = field(default_factory=set)  # properties entities may carry
    relations: dict[str, RelationSpec] = field(default_factory=dict)  # relations to link
    missing_properties: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(slots=True)
class EntityWrite:
    entity: MappedEntity
    payload: dict[str, Any]
    created: bool


class Importer:
    def __init__(
        self,
        client: Client,
        *,
        dry_run: bool = False,
        runner_url: str | None = None,
        prune: bool = False,
    ) -> None:
        self.client = client
        self.runner_url = runner_url
        self.prune = prune
        # With --prune: the refs some document of the files names (their entities and
        # workflows stay), and the server's entities to delete, per blueprint.
        self._held: set[tuple[str, str, str]] = set()
        self._doomed: dict[str, dict[str, str]] = {}  # blueprint -> lower id -> ref
        self.report = Report(dry_run=dry_run)
        self._entities: dict[str, dict[str, dict[str, Any]]] = {}  # server's, per blueprint
        self._server_blueprints: dict[str, dict[str, Any]] = {}
        self._team_names: dict[str, str] = {}  # lower-cased -> name, server's and the input's
        self._workflows: dict[str, dict[str, Any]] | None = None

    def run(self, paths: list[Path]) -> Report:
        reading = read(paths)
        self.report.files = reading.files
        self.report.documents = len(reading.documents)
        self.report.ignored = reading.ignored
        self.report.problems.extend(reading.problems)
        catalog = map_documents(reading.documents)
        self.report.problems.extend(catalog.problems)
        self._held = {self_ref(d).key for d in reading.documents if isinstance(_name_of(d), str)}
        if catalog.empty:
            return self.report
        # Templates count once one maps to a workflow (below).
        self.report.imported_anything = bool(catalog.entities or catalog.teams or catalog.users)
        try:
            self._import(catalog)
        except ApiError as exc:
            self.report.errors.append(str(exc))
        except httpx.HTTPError as exc:
            self.report.errors.append(f"cannot reach the server: {exc}")
        self.report.problems.sort(key=lambda p: (p.file, p.document, p.code, p.message))
        return self.report

    def _import(self, catalog: Catalog) -> None:
        self._server_blueprints = {
            b["identifier"]: b for b in self.client.get("/v1/blueprints")["blueprints"]
        }
        plans = self._plan_blueprints(catalog)
        if self.prune:
            self._plan_prune()
        self._apply_blueprints(plans)
        teams = self._sync_teams(catalog)
        self._sync_users(catalog, teams)
        self._sync_entities(catalog, plans, teams)
        self._sync_workflows(catalog, set(self._server_blueprints) | set(plans))
        if self.prune:
            self._apply_prune()

    # -- blueprints ----------------------------------------------------------------------

    def _plan_blueprints(self, catalog: Catalog) -> dict[str, BlueprintPlan]:
        needed = [bp for bp in WRITE_ORDER if bp in catalog.kinds()]
        available = set(self._server_blueprints) | set(needed)
        plans: dict[str, BlueprintPlan] = {}
        for bp in needed:
            spec = BLUEPRINTS[bp]
            current = self._server_blueprints.get(bp)
            plan = BlueprintPlan(bp, current is not None, current)
            have_props = (current or {}).get("schema", {}).get("properties", {})
            for name, prop in spec.properties.items():
                theirs = have_props.get(name)
                if theirs is None:
                    plan.missing_properties[name] = prop
                    plan.properties.add(name)
                elif theirs.get("type") == prop["type"]:
                    plan.properties.add(name)
                else:
                    self.report.problems.append(
                        Problem(
                            "conflict",
                            f"blueprint {bp}: property {name} is of type {theirs.get('type')}, "
                            f"not {prop['type']}: Backstage values for it are not written",
                        )
                    )
            have_rels = (current or {}).get("relations", {})
            for name, rel in spec.relations.items():
                theirs = have_rels.get(name)
                if theirs is not None and (
                    theirs.get("target") != rel.target or bool(theirs.get("many")) != rel.many
                ):
                    self.report.problems.append(
                        Problem(
                            "conflict",
                            f"blueprint {bp}: relation {name} targets {theirs.get('target')} "
                            f"(many: {bool(theirs.get('many'))}), not {rel.target} "
                            f"(many: {rel.many}): its links are not written",
                        )
                    )
                elif rel.target in available:
                    plan.relations[name] = rel
            plans[bp] = plan
        return plans

    def _apply_blueprints(self, plans: dict[str, BlueprintPlan]) -> None:
        present = set(self._server_blueprints)
        for bp, plan in plans.items():
            if plan.exists:
                continue
            spec = BLUEPRINTS[bp]
            # Relations towards blueprints created later are added once those exist.
            ready = {n: r for n, r in plan.relations.items() if r.target in present | {bp}}
            if not self.report.dry_run:
                created = self.client.post("/v1/blueprints", spec.definition(ready))
                self._server_blueprints[bp] = created["blueprint"]
            present.add(bp)
            self.report.blueprints[bp] = "created"
        for bp, plan in plans.items():
            current = self._server_blueprints.get(bp)
            if current is None:  # dry run: it would be created whole
                continue
            relations = dict(current.get("relations", {}))
            missing_rels = {n: r for n, r in plan.relations.items() if n not in relations}
            missing_props = plan.missing_properties if plan.exists else {}
            if not missing_rels and not missing_props:
                self.report.blueprints.setdefault(bp, "unchanged")
                continue
            relations.update({n: r.as_json() for n, r in missing_rels.items()})
            schema = dict(current.get("schema", {}))
            schema["properties"] = {**schema.get("properties", {}), **missing_props}
            if not self.report.dry_run:
                patched = self.client.patch(
                    f"/v1/blueprints/{bp}", {"schema": schema, "relations": relations}
                )
                self._server_blueprints[bp] = patched["blueprint"]
            self.report.blueprints.setdefault(bp, "extended")

    # -- teams and users -----------------------------------------------------------------

    def _sync_teams(self, catalog: Catalog) -> dict[tuple[str, str, str], str]:
        """Creates the Groups' teams; returns team names by group ref key."""
        server = {t["name"]: t for t in self.client.get("/v1/teams")["teams"]}
        self._team_names = {name.lower(): name for name in server}
        names: dict[tuple[str, str, str], str] = {}
        for key, team in catalog.teams.items():
            existing = server.get(team.name) or server.get(
                self._team_names.get(team.name.lower(), "")
            )
            try:
                if existing is None:
                    body: dict[str, Any] = {"name": team.name}
                    if team.description:
                        body["description"] = team.description
                    if not self.report.dry_run:
                        self.client.post("/v1/teams", body)
                    self.report.teams.created += 1
                    names[key] = team.name
                elif team.description and existing.get("description") != team.description:
                    if not self.report.dry_run:
                        self.client.patch(
                            f"/v1/teams/{existing['name']}", {"description": team.description}
                        )
                    self.report.teams.updated += 1
                    names[key] = existing["name"]
                else:
                    self.report.teams.unchanged += 1
                    names[key] = existing["name"]
            except ApiError as exc:
                self.report.teams.failed += 1
                self.report.errors.append(f"{team.origin.ref}: {exc}")
                continue
            self._team_names[names[key].lower()] = names[key]
        return names

    def _team_of(
        self, group: Ref, teams: dict[tuple[str, str, str], str], origin: Origin, what: str
    ) -> str | None:
        name = teams.get(group.key) or self._team_names.get(group.identifier.lower())
        if name is None:
            self.report.problems.append(
                origin.problem(
                    "dangling-ref",
                    f"{what} {group}: no such Group in the input or team on the server",
                )
            )
        return name

    def _sync_users(self, catalog: Catalog, teams: dict[tuple[str, str, str], str]) -> None:
        server = {u["email"].lower(): u for u in self.client.get("/v1/users")["users"]}
        seen: set[str] = set()
        for user in catalog.users.values():
            if user.email in seen:
                self.report.problems.append(
                    user.origin.problem("duplicate", f"another User has the email {user.email}")
                )
                continue
            seen.add(user.email)
            wanted: set[str] = set()
            for group, origin in user.groups:
                what = "spec.memberOf" if origin is user.origin else "spec.members"
                name = self._team_of(group, teams, origin, what)
                if name is not None:
                    wanted.add(name)
            existing = server.get(user.email)
            try:
                if existing is None:
                    invitee: dict[str, Any] = {"email": user.email}
                    if wanted:
                        invitee["teams"] = sorted(wanted)
                    if not self.report.dry_run:
                        self.client.post("/v1/users/invite", {"invitee": invitee})
                    self.report.users.created += 1
                    continue
                current = set(existing.get("teams") or [])
                if wanted <= current:
                    self.report.users.unchanged += 1
                    continue
                if not self.report.dry_run:  # the user's other teams stay
                    self.client.patch(
                        f"/v1/users/{user.email}", {"teams": sorted(current | wanted)}
                    )
                self.report.users.updated += 1
            except ApiError as exc:
                self.report.users.failed += 1
                self.report.errors.append(f"{user.origin.ref}: {exc}")

    # -- workflows (Scaffolder templates) -------------------------------------------------

    def _server_workflows(self) -> dict[str, dict[str, Any]]:
        if self._workflows is None:
            listed = self.client.get("/v1/workflows")["workflows"]
            self._workflows = {w["identifier"]: w for w in listed}
        return self._workflows

    def _sync_workflows(self, catalog: Catalog, blueprints: set[str]) -> None:
        if not catalog.templates:
            return
        server = self._server_workflows()
        for document in catalog.templates.values():
            mapped = map_template(
                document,
                _template_ref(document),
                runner_url=self.runner_url,
                blueprints=blueprints,
                problems=self.report.problems,
            )
            self.report.templates.append(self._write_workflow(mapped, server))

    def _write_workflow(self, mapped: MappedTemplate, server: dict[str, Any]) -> TemplateLine:
        line = TemplateLine(
            str(mapped.ref),
            mapped.origin.file,
            mapped.origin.document,
            mapped.identifier,
            "skipped",
            mapped.inputs,
            mapped.steps,
        )
        definition = mapped.definition
        if definition is None:
            return line
        existing = server.get(mapped.identifier)
        if existing is not None and template_of(existing) != str(mapped.ref):
            # Made by hand or by `portolan apply`: not the import's to replace.
            self.report.problems.append(
                mapped.origin.problem(
                    "conflict",
                    f"workflow {mapped.identifier} exists and was not made of this Template: "
                    "left as it is",
                )
            )
            return line
        self.report.imported_anything = True
        try:
            if existing is None:
                if not self.report.dry_run:
                    self.client.post("/v1/workflows", definition)
                line.status = "created"
                self.report.workflows.created += 1
            elif _same_workflow(definition, existing):
                line.status = "unchanged"
                self.report.workflows.unchanged += 1
            else:
                if not self.report.dry_run:
                    self.client.put(f"/v1/workflows/{mapped.identifier}", definition)
                line.status = "updated"
                self.report.workflows.updated += 1
        except ApiError as exc:
            line.status = "failed"
            self.report.workflows.failed += 1
            origin = mapped.origin
            detail = "; ".join(
                f"{d.get('pointer')}: {d.get('message')}"
                for d in exc.details or []
                if isinstance(d, dict)
            )
            self.report.errors.append(
                f"{origin.file}#{origin.document} {origin.ref}: {exc}"
                + (f" ({detail})" if detail else "")
            )
        return line

    # -- prune ---------------------------------------------------------------------------

    def _plan_prune(self) -> None:
        """The entities an earlier import wrote (their `backstageRef`) whose document no file
        holds any more. Known before anything is written, so no link is made to them."""
        for bp in WRITE_ORDER:
            if bp not in self._server_blueprints:
                continue
            for key, entity in self._server_entities(bp).items():
                ref = (entity.get("properties") or {}).get("backstageRef")
                if not isinstance(ref, str):
                    continue  # not written by an import: left alone
                try:
                    parsed = parse_ref(ref, default_kind=None, default_namespace="default")
                except ValueError:
                    continue
                if parsed.key not in self._held:
                    self._doomed.setdefault(bp, {})[key] = ref

    def _apply_prune(self) -> None:
        """Deletes those entities (entities pointing at others first) and the workflows an
        earlier import made of Templates no file holds. Teams and users are never deleted."""
        for bp in reversed(WRITE_ORDER):
            doomed = self._doomed.get(bp, {})
            entities = self._server_entities(bp)
            identifiers = sorted(entities[key]["identifier"] for key in doomed)
            for start in range(0, len(identifiers), PRUNE_LIMIT):
                chunk = identifiers[start : start + PRUNE_LIMIT]
                try:
                    if not self.report.dry_run:
                        self.client.post(
                            f"/v1/blueprints/{bp}/bulk/entities/delete", {"entities": chunk}
                        )
                except ApiError as exc:
                    self.report.errors.append(f"pruning {bp} {', '.join(chunk)}: {exc}")
                    continue
                self.report.pruned.extend(
                    f"{doomed[i.lower()]}: entity {i} of blueprint {bp}" for i in chunk
                )
        for identifier, workflow in sorted(self._server_workflows().items()):
            ref = template_of(workflow)
            if ref is None:
                continue
            try:
                parsed = parse_ref(ref, default_kind=None, default_namespace="default")
            except ValueError:
                continue
            if parsed.key in self._held or parsed.identifier != identifier:
                continue
            try:
                if not self.report.dry_run:
                    self.client.delete(f"/v1/workflows/{identifier}")
            except ApiError as exc:
                self.report.errors.append(f"pruning workflow {identifier}: {exc}")
                continue
            self.report.pruned.append(f"{ref}: workflow {identifier}")

    # -- entities ------------------------------------------------------------------------

    def _server_entities(self, bp: str) -> dict[str, dict[str, Any]]:
        """The server's entities of a blueprint, by lower-cased identifier."""
        if bp not in self._entities:
            if bp in self._server_blueprints:
                body = self.client.get(f"/v1/blueprints/{bp}/entities")
                self._entities[bp] = {e["identifier"].lower(): e for e in body["entities"]}
            else:
                self._entities[bp] = {}
        return self._entities[bp]

    def _resolve(self, link: Link, catalog: Catalog, origin: Origin) -> str | None:
        # The server's spelling first: identifiers are case-sensitive, Backstage refs are not.
        key = link.ref.identifier.lower()
        theirs = self._server_entities(link.blueprint).get(key)
        if theirs is not None and key not in self._doomed.get(link.blueprint, {}):
            return str(theirs["identifier"])
        mine = catalog.entities.get(link.ref.key)
        if mine is not None:
            return mine.identifier
        self.report.problems.append(
            origin.problem(
                "dangling-ref",
                f"{link.field} {link.ref}: not in the input and not on the server (kept as "
                "text in property backstage.unresolvedRefs)",
            )
        )
        return None

    def _payload(
        self,
        entity: MappedEntity,
        plan: BlueprintPlan,
        catalog: Catalog,
        teams: dict[tuple[str, str, str], str],
    ) -> dict[str, Any]:
        team: list[str] = []
        if entity.owner is not None and entity.owner.kind == "group":
            name = self._team_of(entity.owner, teams, entity.origin, "spec.owner")
            if name is not None:
                team = [name]
        relations: dict[str, Any] = {}
        unresolved: dict[str, list[str]] = {}
        conflicting = set((plan.definition or {}).get("relations", {})) - set(plan.relations)
        for name, spec in BLUEPRINTS[entity.blueprint].relations.items():
            if name in conflicting:  # reported once, for the blueprint
                continue
            found: set[str] = set()
            for link in entity.relations[name]:
                target = self._resolve(link, catalog, entity.origin)
                if target is None:
                    # Kept as text, as the owner ref is: the link is made once the target
                    # is imported.
                    unresolved.setdefault(name, []).append(str(link.ref))
                else:
                    found.add(target)
            targets = sorted(found)
            if name not in plan.relations:
                continue
            if spec.many:
                relations[name] = targets or None
            else:
                relations[name] = targets[0] if targets else None
        properties = dict(entity.properties)
        if unresolved:
            properties["backstage"] = {
                **(properties.get("backstage") or {}),
                "unresolvedRefs": {k: sorted(v) for k, v in unresolved.items()},
            }
        return {
            "identifier": entity.identifier,
            "title": entity.title,
            "team": team,
            "properties": {k: v for k, v in properties.items() if k in plan.properties},
            "relations": relations,
        }

    def _sync_entities(
        self,
        catalog: Catalog,
        plans: dict[str, BlueprintPlan],
        teams: dict[tuple[str, str, str], str],
    ) -> None:
        writes: dict[str, list[EntityWrite]] = {}
        for bp in WRITE_ORDER:
            if bp not in plans:
                continue
            counts = self.report.entities.setdefault(bp, Counts())
            for entity in sorted(
                (e for e in catalog.entities.values() if e.blueprint == bp),
                key=lambda e: e.identifier,
            ):
                payload = self._payload(entity, plans[bp], catalog, teams)
                existing = self._server_entities(bp).get(entity.identifier.lower())
                if existing is not None:
                    payload["identifier"] = existing["identifier"]
                    if _same(payload, existing, BLUEPRINTS[bp].relations):
                        counts.unchanged += 1
                        continue
                    counts.updated += 1
                else:
                    counts.created += 1
                writes.setdefault(bp, []).append(EntityWrite(entity, payload, existing is None))
        if not self.report.dry_run:
            self._write(writes)

    def _write(self, writes: dict[str, list[EntityWrite]]) -> None:
        """Pass one writes each blueprint's entities in WRITE_ORDER with the links whose
        targets exist by then; pass two adds the links held back (towards entities written
        later, e.g. a resource that depends on a component)."""
        pending = {(bp, w.payload["identifier"]) for bp, ws in writes.items() for w in ws}
        deferred: dict[str, list[tuple[EntityWrite, dict[str, Any]]]] = {}
        failed_any: set[tuple[str, str]] = set()
        for bp, items in writes.items():
            relation_targets = {n: r.target for n, r in BLUEPRINTS[bp].relations.items()}
            for start in range(0, len(items), BULK_LIMIT):
                chunk = items[start : start + BULK_LIMIT]
                in_chunk = {(bp, w.payload["identifier"]) for w in chunk}
                bodies = []
                for w in chunk:
                    body = dict(w.payload)
                    later: dict[str, Any] = {}
                    now: dict[str, Any] = {}
                    for name, given in w.payload["relations"].items():
                        target_bp = relation_targets[name]
                        value = self._without_failed(w, name, given, target_bp, failed_any)
                        targets = value if isinstance(value, list) else [value] if value else []
                        waiting = [
                            t
                            for t in targets
                            if (target_bp, t) in pending and (target_bp, t) not in in_chunk
                        ]
                        (later if waiting else now)[name] = value
                    body["relations"] = now
                    if later:
                        deferred.setdefault(bp, []).append((w, later))
                    bodies.append(body)
                failed = self._bulk(bp, chunk, bodies)
                pending -= in_chunk - failed
                failed_any |= failed
        for bp, held in deferred.items():
            linkable = [(w, r) for w, r in held if (bp, w.payload["identifier"]) not in failed_any]
            for start in range(0, len(linkable), BULK_LIMIT):
                part = linkable[start : start + BULK_LIMIT]
                bodies = [
                    {
                        "identifier": w.payload["identifier"],
                        "relations": {
                            name: self._without_failed(
                                w, name, value, BLUEPRINTS[bp].relations[name].target, failed_any
                            )
                            for name, value in rels.items()
                        },
                    }
                    for w, rels in part
                ]
                failed_any |= self._bulk(bp, [w for w, _ in part], bodies)

    def _without_failed(
        self, w: EntityWrite, name: str, value: Any, target_bp: str, failed: set[tuple[str, str]]
    ) -> Any:
        """A link to an entity the server refused is left out (and reported) rather than
        failing this entity too."""
        targets = value if isinstance(value, list) else [value] if value else []
        refused = [t for t in targets if (target_bp, t) in failed]
        if not refused:
            return value
        for t in refused:
            self.report.problems.append(
                w.entity.origin.problem(
                    "unlinked", f"relation {name} to {target_bp} {t}: that entity was refused"
                )
            )
        if isinstance(value, list):
            return [t for t in value if t not in refused] or None
        return None

    def _bulk(
        self, bp: str, chunk: list[EntityWrite], bodies: list[dict[str, Any]]
    ) -> set[tuple[str, str]]:
        """One bulk call; the keys of the entities it could not write."""
        answer = self.client.post(
            f"/v1/blueprints/{bp}/entities/bulk", {"entities": bodies}, params=_BULK_PARAMS
        )
        failed: set[tuple[str, str]] = set()
        counts = self.report.entities[bp]
        for error in answer.get("errors") or []:
            w = chunk[int(error["index"])]
            key = (bp, w.payload["identifier"])
            if key in failed:
                continue
            failed.add(key)
            if w.created:
                counts.created -= 1
            else:
                counts.updated -= 1
            counts.failed += 1
            origin = w.entity.origin
            self.report.errors.append(
                f"{origin.file}#{origin.document} {origin.ref}: {error.get('statusCode')} "
                f"{error.get('error')}: {error.get('message')}"
            )
        return failed


def _same(payload: dict[str, Any], existing: dict[str, Any], rels: dict[str, RelationSpec]) -> bool:
    """Whether writing the payload (merged into the entity) would change nothing."""
    if payload["title"] != existing.get("title"):
        return False
    if sorted(payload["team"]) != sorted(existing.get("team") or []):
        return False
    props = existing.get("properties") or {}
    if any(props.get(k) != v for k, v in payload["properties"].items()):
        return False
    current = existing.get("relations") or {}
    for name, value in payload["relations"].items():
        theirs = current.get(name)
        if rels[name].many:
            if sorted(theirs or []) != sorted(value or []):
                return False
        elif (theirs or None) != value:
            return False
    return True


def _same_workflow(definition: dict[str, Any], existing: dict[str, Any]) -> bool:
    """Whether the server's workflow is this definition (so saving it would only make a
    needless new version)."""
    keys = ("title", "icon", "description", "category", "nodes", "connections")
    if any(definition.get(k) != existing.get(k) for k in keys):
        return False
    return bool(existing.get("allowAnyoneToViewRuns", True)) == bool(
        definition.get("allowAnyoneToViewRuns", True)
    )


def _name_of(document: Document) -> Any:
    metadata = document.body.get("metadata")
    return metadata.get("name") if isinstance(metadata, dict) else None


def _template_ref(document: Document) -> Ref:
    return self_ref(document)


def import_catalog(
    client: Client,
    paths: list[Path],
    *,
    dry_run: bool = False,
    runner_url: str | None = None,
    prune: bool = False,
) -> Report:
    return Importer(client, dry_run=dry_run, runner_url=runner_url, prune=prune).run(paths)
