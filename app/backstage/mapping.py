"""Backstage documents -> Portolan's shapes: blueprint definitions per kind, entities with
their links, teams (Groups) and users (Users). Refs are parsed here; whether their targets
exist (in the input or on the server) is the importer's question."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.backstage.reader import API_VERSIONS, Document, Problem

DEFAULT_NAMESPACE = "default"
TEMPLATE_API_VERSION = "scaffolder.backstage.io/v1beta3"
# Group names become team names: Port's rule (no ; # / ?, two characters at least).
_TEAM_NAME = re.compile(r"^[^;#/?\s\x00-\x1f\x7f][^;#/?\x00-\x1f\x7f]*[^;#/?\s\x00-\x1f\x7f]$")


# ------------------------------------------------------------------------------------------
# Refs


@dataclass(frozen=True, slots=True)
class Ref:
    """A Backstage entity ref `kind:namespace/name`; kinds are kept lower-cased."""

    kind: str
    namespace: str
    name: str

    @property
    def key(self) -> tuple[str, str, str]:
        """Backstage compares refs case-insensitively."""
        return (self.kind, self.namespace.lower(), self.name.lower())

    @property
    def identifier(self) -> str:
        """The entity identifier / team name: the name, prefixed `namespace:` outside the
        default namespace (team names cannot hold `/`, so both use the same form)."""
        if self.namespace.lower() == DEFAULT_NAMESPACE:
            return self.name
        return f"{self.namespace}:{self.name}"

    def __str__(self) -> str:
        return f"{self.kind}:{self.namespace}/{self.name}"


def parse_ref(value: Any, *, default_kind: str | None, default_namespace: str) -> Ref:
    """`[kind:][namespace/]name`. A missing kind takes `default_kind` (none: the ref must
    name one); a missing namespace takes the referring entity's."""
    if isinstance(value, dict):  # the compound form {kind, namespace, name}
        parts = (
            value.get("kind") or default_kind,
            value.get("namespace") or default_namespace,
            value.get("name"),
        )
        if not all(isinstance(v, str) and v for v in parts):
            raise ValueError(f"ref {json.dumps(value)} needs a kind and a name")
        return Ref(str(parts[0]).lower(), str(parts[1]), str(parts[2]))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"ref {json.dumps(value)} is not a string")
    text = value.strip()
    kind: str | None = default_kind
    if ":" in text:
        kind, text = text.split(":", 1)
    namespace = default_namespace
    if "/" in text:
        namespace, text = text.split("/", 1)
    if not kind:
        raise ValueError(f"ref {value!r} needs a kind (kind:name)")
    if not namespace or not text or "/" in text or ":" in text:
        raise ValueError(f"ref {value!r} is not of the form [kind:][namespace/]name")
    return Ref(kind.lower(), namespace, text)


def self_ref(document: Document) -> Ref:
    metadata = document.body.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    namespace = metadata.get("namespace") or DEFAULT_NAMESPACE
    return Ref(document.kind.lower(), str(namespace), str(metadata.get("name")))


# ------------------------------------------------------------------------------------------
# Blueprints


@dataclass(frozen=True, slots=True)
class RelationSpec:
    target: str
    many: bool
    title: str

    def as_json(self) -> dict[str, Any]:
        return {"target": self.target, "many": self.many, "required": False, "title": self.title}


@dataclass(frozen=True, slots=True)
class BlueprintSpec:
    identifier: str
    title: str
    icon: str
    properties: dict[str, dict[str, Any]]
    relations: dict[str, RelationSpec]

    def definition(self, relations: dict[str, RelationSpec]) -> dict[str, Any]:
        return {
            "identifier": self.identifier,
            "title": self.title,
            "icon": self.icon,
            "description": f"Backstage {self.title} entities",
            "schema": {"properties": self.properties, "required": []},
            "relations": {name: spec.as_json() for name, spec in relations.items()},
        }


# Which document an entity came from: what `--prune` reads to find what an earlier import
# wrote and the files no longer hold.
_BACKSTAGE_REF: dict[str, dict[str, Any]] = {
    "backstageRef": {
        "type": "string",
        "title": "Backstage ref",
        "description": "The document this entity was imported from (kind:namespace/name)",
    }
}


def _common(**extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    props: dict[str, dict[str, Any]] = {
        "type": {"type": "string", "title": "Type"},
        **extra,
        "description": {"type": "string", "title": "Description"},
        "tags": {"type": "array", "items": {"type": "string"}, "title": "Tags"},
        "links": {
            "type": "array",
            "items": {"type": "object"},
            "title": "Links",
            "description": "Backstage links: url, title, icon, type",
        },
        "annotations": {"type": "object", "title": "Annotations"},
        "labels": {"type": "object", "title": "Labels"},
        "owner": {
            "type": "string",
            "title": "Owner",
            "description": "The Backstage owner ref (kind:namespace/name)",
        },
        "backstage": {
            "type": "object",
            "title": "Other Backstage fields",
            "description": "metadata and spec fields with no property of their own",
        },
        **_BACKSTAGE_REF,
    }
    return props


_LIFECYCLE = {"type": "string", "title": "Lifecycle"}
_DEPENDS = {
    "dependsOnComponents": RelationSpec("component", True, "Depends on (components)"),
    "dependsOnResources": RelationSpec("resource", True, "Depends on (resources)"),
}

# A Group is a team and also an entity of blueprint `group` (identifier: the team's name, its
# team: that team), so the hierarchy Portolan's flat teams cannot hold is a relation.
_GROUP_PROPERTIES: dict[str, dict[str, Any]] = {
    "type": {"type": "string", "title": "Type"},
    "description": {"type": "string", "title": "Description"},
    "email": {"type": "string", "title": "Email"},
    "tags": {"type": "array", "items": {"type": "string"}, "title": "Tags"},
    "links": {"type": "array", "items": {"type": "object"}, "title": "Links"},
    "annotations": {"type": "object", "title": "Annotations"},
    "labels": {"type": "object", "title": "Labels"},
    "backstage": {
        "type": "object",
        "title": "Other Backstage fields",
        "description": "refs not linked (unresolvedRefs)",
    },
    **_BACKSTAGE_REF,
}

BLUEPRINTS: dict[str, BlueprintSpec] = {
    "group": BlueprintSpec(
        "group",
        "Group",
        "Team",
        _GROUP_PROPERTIES,
        {"parent": RelationSpec("group", False, "Parent group")},
    ),
    "domain": BlueprintSpec(
        "domain",
        "Domain",
        "Bucket",
        _common(),
        {"subdomainOf": RelationSpec("domain", False, "Subdomain of")},
    ),
    "system": BlueprintSpec(
        "system",
        "System",
        "Cluster",
        _common(),
        {"domain": RelationSpec("domain", False, "Domain")},
    ),
    "api": BlueprintSpec(
        "api",
        "API",
        "API",
        _common(
            lifecycle=_LIFECYCLE,
            definition={
                "type": "string",
                "title": "Definition",
                "description": "The API's definition (OpenAPI, AsyncAPI, GraphQL, gRPC ...)",
            },
        ),
        {"system": RelationSpec("system", False, "System")},
    ),
    "resource": BlueprintSpec(
        "resource",
        "Resource",
        "Database",
        _common(),
        {"system": RelationSpec("system", False, "System"), **_DEPENDS},
    ),
    "component": BlueprintSpec(
        "component",
        "Component",
        "Microservice",
        _common(lifecycle=_LIFECYCLE),
        {
            "system": RelationSpec("system", False, "System"),
            "subcomponentOf": RelationSpec("component", False, "Subcomponent of"),
            "providesApis": RelationSpec("api", True, "Provides APIs"),
            "consumesApis": RelationSpec("api", True, "Consumes APIs"),
            **_DEPENDS,
        },
    ),
}
# Blueprints in the order entities are written: targets before the entities pointing at them
# (resource <-> component links go both ways; the later ones are written second).
WRITE_ORDER = ("group", "domain", "system", "api", "resource", "component")
# Backstage kind (lower-cased) -> blueprint
KIND_BLUEPRINTS = {
    "component": "component",
    "api": "api",
    "resource": "resource",
    "system": "system",
    "domain": "domain",
}

# spec fields that become relations: field -> (default kind, {target kind: relation})
_REF_FIELDS: dict[str, dict[str, tuple[str | None, dict[str, str]]]] = {
    "component": {
        "system": ("system", {"system": "system"}),
        "subcomponentOf": ("component", {"component": "subcomponentOf"}),
        "providesApis": ("api", {"api": "providesApis"}),
        "consumesApis": ("api", {"api": "consumesApis"}),
        "dependsOn": (
            None,
            {"component": "dependsOnComponents", "resource": "dependsOnResources"},
        ),
    },
    "api": {"system": ("system", {"system": "system"})},
    "resource": {
        "system": ("system", {"system": "system"}),
        "dependsOn": (
            None,
            {"component": "dependsOnComponents", "resource": "dependsOnResources"},
        ),
    },
    "system": {"domain": ("domain", {"domain": "domain"})},
    "domain": {"subdomainOf": ("domain", {"domain": "subdomainOf"})},
}
# spec fields read as properties (beside owner, the refs above and dependencyOf)
_SPEC_PROPERTIES = {
    "component": ("type", "lifecycle"),
    "api": ("type", "lifecycle", "definition"),
    "resource": ("type",),
    "system": ("type",),
    "domain": ("type",),
}
_KNOWN_METADATA = {
    "name",
    "namespace",
    "title",
    "description",
    "labels",
    "annotations",
    "tags",
    "links",
}
# Set by a Backstage server, not by authors (found in exported catalogs); top-level
# `relations` and `status` are computed by it too.
_SERVER_METADATA = {"uid", "etag", "generation"}
_GROUP_SPEC = {"type", "profile", "parent", "children", "members"}
_USER_SPEC = {"profile", "memberOf"}


# ------------------------------------------------------------------------------------------
# Mapped catalog


@dataclass(frozen=True, slots=True)
class Origin:
    file: str
    document: int
    ref: str

    def problem(self, code: str, message: str) -> Problem:
        return Problem(code, message, self.file, self.document, self.ref)


@dataclass(frozen=True, slots=True)
class Link:
    """One relation target, with where it came from (for reporting)."""

    ref: Ref
    blueprint: str
    field: str


@dataclass(slots=True)
class MappedEntity:
    ref: Ref
    blueprint: str
    origin: Origin
    title: str
    owner: Ref | None
    properties: dict[str, Any]
    relations: dict[str, list[Link]]

    @property
    def identifier(self) -> str:
        return self.ref.identifier


@dataclass(slots=True)
class MappedTeam:
    ref: Ref
    origin: Origin
    description: str | None

    @property
    def name(self) -> str:
        return self.ref.identifier


@dataclass(slots=True)
class MappedUser:
    ref: Ref
    origin: Origin
    email: str
    # group refs, each with the origin that named it (the User's memberOf or a Group's members)
    groups: list[tuple[Ref, Origin]] = field(default_factory=list)


@dataclass(slots=True)
class Catalog:
    entities: dict[tuple[str, str, str], MappedEntity] = field(default_factory=dict)
    teams: dict[tuple[str, str, str], MappedTeam] = field(default_factory=dict)
    users: dict[tuple[str, str, str], MappedUser] = field(default_factory=dict)
    # Scaffolder Templates, mapped to workflows by the importer (which knows the blueprints)
    templates: dict[tuple[str, str, str], Document] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.entities or self.teams or self.users or self.templates)

    def kinds(self) -> set[str]:
        return {e.blueprint for e in self.entities.values()}


# ------------------------------------------------------------------------------------------
# Mapping


def map_documents(documents: list[Document]) -> Catalog:
    catalog = Catalog()
    groups: list[tuple[Document, Ref]] = []
    for document in documents:
        ref = _check(document, catalog)
        if ref is None:
            continue
        if (
            ref.key in catalog.entities
            or ref.key in catalog.teams
            or ref.key in catalog.users
            or ref.key in catalog.templates
        ):
            catalog.problems.append(
                Problem(
                    "duplicate",
                    f"{ref} is defined twice: this one is ignored",
                    document.file,
                    document.index,
                    str(ref),
                )
            )
            continue
        if ref.kind in KIND_BLUEPRINTS:
            catalog.entities[ref.key] = _entity(document, ref, catalog.problems)
        elif ref.kind == "group":
            team = _team(document, ref, catalog.problems)
            if team is not None:
                catalog.teams[ref.key] = team
                catalog.entities[ref.key] = _group_entity(document, ref, team, catalog.problems)
                groups.append((document, ref))
        elif ref.kind == "user":
            user = _user(document, ref, catalog.problems)
            if user is not None:
                catalog.users[ref.key] = user
        elif ref.kind == "template":
            catalog.templates[ref.key] = document
    _dependency_of(documents, catalog)
    _group_links(groups, catalog)
    return catalog


def _check(document: Document, catalog: Catalog) -> Ref | None:
    """The document's own ref, or None (with a problem) when it is not importable."""
    body = document.body

    def skip(code: str, message: str, ref: str = "") -> None:
        catalog.problems.append(Problem(code, message, document.file, document.index, ref))

    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        skip("invalid-document", "metadata.name is missing")
        return None
    kind = document.kind
    if not kind:
        skip("invalid-document", "kind is missing")
        return None
    if "${{" in metadata["name"]:
        skip(
            "skeleton",
            f"metadata.name {metadata['name']!r} holds a template expression: a document of a "
            "Template's skeleton, not of the catalog",
        )
        return None
    ref = self_ref(document)
    if ref.kind == "location":
        skip(
            "unsupported-kind",
            "Location is not imported itself (its local targets are read)",
            str(ref),
        )
        return None
    if ref.kind not in KIND_BLUEPRINTS and ref.kind not in ("group", "user", "template"):
        skip("unsupported-kind", f"kind {kind} has no Portolan counterpart", str(ref))
        return None
    api_version = body.get("apiVersion")
    if ref.kind == "template":
        if api_version != TEMPLATE_API_VERSION:
            skip(
                "unsupported-api-version",
                f"a Template's apiVersion {api_version!r} is not {TEMPLATE_API_VERSION}",
                str(ref),
            )
            return None
    elif api_version not in API_VERSIONS:
        skip(
            "unsupported-api-version",
            f"apiVersion {api_version!r} is not one of {', '.join(API_VERSIONS)}",
            str(ref),
        )
        return None
    if body.get("spec") is not None and not isinstance(body.get("spec"), dict):
        skip("invalid-document", "spec must be a mapping", str(ref))
        return None
    return ref


def _spec(document: Document) -> dict[str, Any]:
    spec = document.body.get("spec")
    return spec if isinstance(spec, dict) else {}


def _metadata(document: Document) -> dict[str, Any]:
    metadata = document.body.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _entity(document: Document, ref: Ref, problems: list[Problem]) -> MappedEntity:
    kind = ref.kind
    blueprint = KIND_BLUEPRINTS[kind]
    origin = Origin(document.file, document.index, str(ref))
    metadata, spec = _metadata(document), _spec(document)
    props: dict[str, Any] = dict.fromkeys(BLUEPRINTS[blueprint].properties)
    props.update(_metadata_properties(metadata, origin, problems))
    for key in _SPEC_PROPERTIES[kind]:
        value = spec.get(key)
        if key == "definition":
            props[key] = _definition(value, document, origin, problems)
        elif value is None:
            continue
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            props[key] = str(value)
        else:
            problems.append(origin.problem("invalid-field", f"spec.{key} must be a string"))

    owner: Ref | None = None
    if spec.get("owner") is not None:
        try:
            owner = parse_ref(spec["owner"], default_kind="group", default_namespace=ref.namespace)
            props["owner"] = str(owner)
            if owner.kind not in ("group", "user"):
                problems.append(
                    origin.problem(
                        "unmapped-ref", f"spec.owner {owner} is neither a Group nor a User"
                    )
                )
                owner = None
        except ValueError as exc:
            problems.append(origin.problem("invalid-ref", f"spec.owner: {exc}"))

    relations: dict[str, list[Link]] = {name: [] for name in BLUEPRINTS[blueprint].relations}
    for key, (default_kind, targets) in _REF_FIELDS[kind].items():
        for raw in _as_list(spec.get(key)):
            try:
                target = parse_ref(raw, default_kind=default_kind, default_namespace=ref.namespace)
            except ValueError as exc:
                problems.append(origin.problem("invalid-ref", f"spec.{key}: {exc}"))
                continue
            relation = targets.get(target.kind)
            if relation is None:
                problems.append(
                    origin.problem(
                        "unmapped-ref",
                        f"spec.{key} {target}: a {target.kind} cannot be the target of {key}",
                    )
                )
                continue
            link = Link(target, KIND_BLUEPRINTS[target.kind], f"spec.{key}")
            if not BLUEPRINTS[blueprint].relations[relation].many and relations[relation]:
                problems.append(origin.problem("invalid-field", f"spec.{key} takes one ref"))
                continue
            relations[relation].append(link)

    known = set(_SPEC_PROPERTIES[kind]) | set(_REF_FIELDS[kind]) | {"owner", "dependencyOf"}
    extra: dict[str, Any] = {}
    unknown_spec = {k: v for k, v in spec.items() if k not in known}
    unknown_metadata = {
        k: v for k, v in metadata.items() if k not in _KNOWN_METADATA | _SERVER_METADATA
    }
    if unknown_metadata:
        extra["metadata"] = unknown_metadata
    if unknown_spec:
        extra["spec"] = unknown_spec
    for key, value in document.body.items():
        if key not in ("apiVersion", "kind", "metadata", "spec", "relations", "status"):
            extra[key] = value
    props["backstage"] = _jsonable(extra) if extra else None
    title = metadata.get("title") if isinstance(metadata.get("title"), str) else None
    props["backstageRef"] = str(ref)
    return MappedEntity(ref, blueprint, origin, title or ref.name, owner, props, relations)


def _jsonable(value: Any) -> Any:
    """YAML can hold dates and other scalars JSON cannot: they are kept as text."""
    result: Any = json.loads(json.dumps(value, default=str))
    return result


def _metadata_properties(
    metadata: dict[str, Any], origin: Origin, problems: list[Problem]
) -> dict[str, Any]:
    props: dict[str, Any] = {}
    description = metadata.get("description")
    if isinstance(description, str):
        props["description"] = description
    elif description is not None:
        problems.append(origin.problem("invalid-field", "metadata.description must be a string"))
    tags = metadata.get("tags")
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        props["tags"] = tags or None
    elif tags is not None:
        problems.append(origin.problem("invalid-field", "metadata.tags must be a list of strings"))
    links = metadata.get("links")
    if isinstance(links, list) and all(isinstance(k, dict) and k.get("url") for k in links):
        props["links"] = _jsonable(links) or None
    elif links is not None:
        problems.append(origin.problem("invalid-field", "metadata.links must be a list of {url}"))
    for key in ("annotations", "labels"):
        value = metadata.get(key)
        if isinstance(value, dict):
            props[key] = {str(k): str(v) for k, v in value.items()} or None
        elif value is not None:
            problems.append(origin.problem("invalid-field", f"metadata.{key} must be a mapping"))
    return props


# Backstage's placeholders for a definition read from a file: `$openapi` and `$asyncapi`
# also resolve the file's own $refs in Backstage; the property keeps the file as written.
_SUBSTITUTIONS = ("$text", "$json", "$yaml", "$openapi", "$asyncapi")


def _definition(
    value: Any, document: Document, origin: Origin, problems: list[Problem]
) -> str | None:
    """spec.definition: text, or a substitution (`$text`, `$json`, `$yaml`, `$openapi`,
    `$asyncapi`) of a local file, read as text: the property holds the definition as
    written."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((how, target),) = value.items()
        if how in _SUBSTITUTIONS and isinstance(target, str):
            if "://" in target:
                problems.append(
                    origin.problem("not-kept", f"spec.definition {how} {target}: not a local file")
                )
                return None
            path = Path(target) if Path(target).is_absolute() else document.path.parent / target
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(
                    origin.problem("not-kept", f"spec.definition {how} {target}: {exc}")
                )
                return None
    problems.append(origin.problem("invalid-field", "spec.definition must be text"))
    return None


def _team(document: Document, ref: Ref, problems: list[Problem]) -> MappedTeam | None:
    origin = Origin(document.file, document.index, str(ref))
    if not _TEAM_NAME.match(ref.identifier) or len(ref.identifier) > 200:
        problems.append(origin.problem("invalid-name", f"{ref.identifier!r} cannot be a team name"))
        return None
    spec, metadata = _spec(document), _metadata(document)
    profile = spec.get("profile") if isinstance(spec.get("profile"), dict) else {}
    display = profile.get("displayName") if isinstance(profile, dict) else None
    description = display if isinstance(display, str) and display else None
    if description is None and isinstance(metadata.get("description"), str):
        description = metadata["description"]
    _report_unknown(spec, _GROUP_SPEC, origin, problems)
    return MappedTeam(ref, origin, description)


def _group_entity(
    document: Document, ref: Ref, team: MappedTeam, problems: list[Problem]
) -> MappedEntity:
    """The Group's entity: owned by its own team; `parent` is set by _group_links."""
    spec, metadata = _spec(document), _metadata(document)
    props: dict[str, Any] = dict.fromkeys(BLUEPRINTS["group"].properties)
    props.update(_metadata_properties(metadata, team.origin, []))  # reported for the team
    if isinstance(spec.get("type"), str):
        props["type"] = spec["type"]
    profile = spec.get("profile") if isinstance(spec.get("profile"), dict) else {}
    email = profile.get("email") if isinstance(profile, dict) else None
    if isinstance(email, str):
        props["email"] = email
    props["backstageRef"] = str(ref)
    display = profile.get("displayName") if isinstance(profile, dict) else None
    title = display if isinstance(display, str) and display else metadata.get("title")
    return MappedEntity(
        ref,
        "group",
        team.origin,
        title if isinstance(title, str) and title else ref.name,
        ref,  # its own team
        props,
        {"parent": []},
    )


def _user(document: Document, ref: Ref, problems: list[Problem]) -> MappedUser | None:
    origin = Origin(document.file, document.index, str(ref))
    spec = _spec(document)
    profile = spec.get("profile") if isinstance(spec.get("profile"), dict) else {}
    email = profile.get("email") if isinstance(profile, dict) else None
    if not isinstance(email, str) or "@" not in email:
        problems.append(
            origin.problem("no-email", "User without spec.profile.email cannot be invited")
        )
        return None
    user = MappedUser(ref, origin, email.strip().lower())
    for raw in _as_list(spec.get("memberOf")):
        try:
            group = parse_ref(raw, default_kind="group", default_namespace=ref.namespace)
        except ValueError as exc:
            problems.append(origin.problem("invalid-ref", f"spec.memberOf: {exc}"))
            continue
        if group.kind != "group":
            problems.append(origin.problem("unmapped-ref", f"spec.memberOf {group} is not a Group"))
            continue
        user.groups.append((group, origin))
    _report_unknown(spec, _USER_SPEC, origin, problems)
    return user


def _report_unknown(
    spec: dict[str, Any], known: set[str], origin: Origin, problems: list[Problem]
) -> None:
    for key in sorted(set(spec) - known):
        problems.append(origin.problem("not-kept", f"spec.{key} has no place in Portolan"))


def _dependency_of(documents: list[Document], catalog: Catalog) -> None:
    """`A dependencyOf B` is `B dependsOn A`: added to B when B is in the input."""
    for document in documents:
        ref = self_ref(document) if isinstance(_metadata(document).get("name"), str) else None
        if ref is None or ref.kind not in ("component", "resource"):
            continue
        mine = catalog.entities.get(ref.key)
        if (
            mine is None
            or mine.origin.document != document.index
            or mine.origin.file != document.file
        ):
            continue
        for raw in _as_list(_spec(document).get("dependencyOf")):
            try:
                dependent = parse_ref(raw, default_kind=None, default_namespace=ref.namespace)
            except ValueError as exc:
                catalog.problems.append(
                    mine.origin.problem("invalid-ref", f"spec.dependencyOf: {exc}")
                )
                continue
            other = catalog.entities.get(dependent.key)
            if dependent.kind not in ("component", "resource") or other is None:
                catalog.problems.append(
                    mine.origin.problem(
                        "not-kept",
                        f"spec.dependencyOf {dependent}: kept only towards components and "
                        "resources of the input",
                    )
                )
                continue
            relation = "dependsOnComponents" if ref.kind == "component" else "dependsOnResources"
            links = other.relations[relation]
            if all(link.ref.key != ref.key for link in links):
                links.append(Link(ref, KIND_BLUEPRINTS[ref.kind], "spec.dependencyOf"))


def _group_links(groups: list[tuple[Document, Ref]], catalog: Catalog) -> None:
    """Group members become memberships of the users; the hierarchy (a Group's `parent`, or
    another's `children`) becomes the `parent` relation between the Groups' entities."""
    edges: dict[tuple[tuple[str, str, str], tuple[str, str, str]], tuple[Ref, Ref, Origin]] = {}
    for document, ref in groups:
        team = catalog.teams[ref.key]
        spec = _spec(document)
        for raw in _as_list(spec.get("members")):
            try:
                member = parse_ref(raw, default_kind="user", default_namespace=ref.namespace)
            except ValueError as exc:
                catalog.problems.append(team.origin.problem("invalid-ref", f"spec.members: {exc}"))
                continue
            user = catalog.users.get(member.key) if member.kind == "user" else None
            if user is None:
                catalog.problems.append(
                    team.origin.problem(
                        "dangling-ref",
                        f"spec.members {member}: no such User in the input (users are matched "
                        "by their email, which only the User document gives)",
                    )
                )
                continue
            if all(g.key != ref.key for g, _ in user.groups):
                user.groups.append((ref, team.origin))
        pairs: list[tuple[Ref, Ref]] = []
        for field_name, as_parent in (("parent", True), ("children", False)):
            for raw in _as_list(spec.get(field_name)):
                try:
                    other = parse_ref(raw, default_kind="group", default_namespace=ref.namespace)
                except ValueError as exc:
                    catalog.problems.append(
                        team.origin.problem("invalid-ref", f"spec.{field_name}: {exc}")
                    )
                    continue
                pairs.append((other, ref) if as_parent else (ref, other))
        for parent, child in pairs:
            edge = (parent.key, child.key)
            if edge not in edges:
                child_team = catalog.teams.get(child.key)
                origin = child_team.origin if child_team is not None else team.origin
                edges[edge] = (parent, child, origin)
    for parent, child, origin in edges.values():
        entity = catalog.entities.get(child.key) if child.kind == "group" else None
        if parent.kind != "group" or entity is None:
            what = parent if parent.kind != "group" else child
            catalog.problems.append(
                origin.problem(
                    "not-kept" if parent.kind == "group" else "unmapped-ref",
                    f"team hierarchy: {child} as a child of {parent}: {what} is not a Group "
                    "of the input (the link is made from the child's own document)",
                )
            )
            continue
        links = entity.relations["parent"]
        if links and links[0].ref.key != parent.key:
            catalog.problems.append(
                origin.problem(
                    "invalid-field",
                    f"team hierarchy: {child} has two parents, {links[0].ref} and {parent}: "
                    "the first is kept",
                )
            )
            continue
        if not links:
            links.append(Link(parent, "group", "spec.parent"))
