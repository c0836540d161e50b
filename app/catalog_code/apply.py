"""`portolan apply`: load, validate, plan, print the plan, then carry it out in dependency
order through the API.

Order: new blueprints first without their relations (and what follows relations: mirror
and aggregation properties, inherited ownership), so blueprints may refer to each other in
cycles; then every new or changed blueprint in full; then scorecards; then actions; then
workflows; with prune, deletions last (workflows, actions, scorecards, then blueprints).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from app.catalog_code import canonical
from app.catalog_code.loader import Problem, load
from app.catalog_code.plan import (
    Change,
    Plan,
    fetch_state,
    make_plan,
    org_mismatch,
    refusals,
    validate,
)
from app.remote import ApiError, Client

EXIT_OK = 0
EXIT_FAILED = 1  # a write was refused: the objects before it were applied
EXIT_INVALID = 2  # the files or the plan are refused: nothing was written
EXIT_REFUSED = 3  # wrong organization, bad credentials, unreachable server: nothing written

_SYMBOLS = {"create": "+", "update": "~", "delete": "-", "unchanged": "="}
_STYLES = {"create": "green", "update": "yellow", "delete": "red", "unchanged": "dim"}


class ApplyFailed(Exception):
    def __init__(self, label: str, error: ApiError) -> None:
        super().__init__(f"{label}: {error}")
        self.label = label
        self.error = error


@dataclass(slots=True)
class Step:
    label: str
    call: Callable[[], Any]
    counts_as: str | None  # the plan's op this step completes, if any


def run(
    client: Client,
    paths: Sequence[Path],
    *,
    org: str | None = None,
    dry_run: bool = False,
    prune: bool = False,
    out: Console | None = None,
    progress_console: Console | None = None,
) -> int:
    """The whole command; returns its exit code."""
    out = out or Console(highlight=False, soft_wrap=True)
    documents, problems = load(paths)
    if problems:
        return _invalid(out, problems)
    try:
        state = fetch_state(client)
    except (ApiError, httpx.HTTPError) as exc:
        out.print(f"error: cannot read the organization's catalog: {exc}", markup=False)
        return EXIT_REFUSED
    if org is not None:
        mismatch = org_mismatch(state.organization, org)
        if mismatch:
            out.print(f"error: {mismatch}", markup=False)
            return EXIT_REFUSED
    desired, problems = validate(documents, state, prune=prune)
    if problems:
        return _invalid(out, problems)
    plan = make_plan(desired, state, prune=prune)
    try:
        problems = refusals(plan, client)
    except (ApiError, httpx.HTTPError) as exc:
        out.print(f"error: {exc}", markup=False)
        return EXIT_REFUSED
    print_plan(out, plan)
    if problems:
        return _invalid(out, problems, "The plan is refused")
    if dry_run:
        out.print("Dry run: nothing was written.")
        return EXIT_OK
    if not plan.writes:
        out.print(f"Nothing to do: {plan.count('unchanged')} unchanged.")
        return EXIT_OK
    done = {"create": 0, "update": 0, "delete": 0}
    try:
        execute(client, plan, done, progress_console or Console(stderr=True))
    except ApplyFailed as failed:
        err = failed.error
        out.print(
            f"error: {failed.label}: the server answered {err.status} {err.code}: {err.message}",
            markup=False,
        )
        for detail in err.details if isinstance(err.details, list) else []:
            if isinstance(detail, dict):
                out.print(
                    f"  {detail.get('pointer', '')}: {detail.get('message', '')}", markup=False
                )
        out.print(f"Stopped. {_summary(done, plan)}", markup=False)
        return EXIT_FAILED
    out.print(f"Applied: {_summary(done, plan)}", markup=False)
    return EXIT_OK


def _invalid(out: Console, problems: list[Problem], headline: str = "Invalid catalog") -> int:
    out.print(f"{headline} ({len(problems)} problem(s)); nothing was written:", markup=False)
    for problem in problems:
        out.print(f"  {problem}", markup=False)
    return EXIT_INVALID


def _summary(done: dict[str, int], plan: Plan) -> str:
    return (
        f"{done['create']} created, {done['update']} updated, {done['delete']} deleted, "
        f"{plan.count('unchanged')} unchanged."
    )


def print_plan(out: Console, plan: Plan) -> None:
    org = plan.organization
    out.print(f"Plan for organization {org.get('name')} ({org.get('id')}):", markup=False)
    width = max((len(c.label) for c in plan.changes), default=0)
    for change in plan.changes:
        detail = f"  ({', '.join(change.keys)})" if change.op == "update" else ""
        line = f"  {_SYMBOLS[change.op]} {change.op:<9} {change.label:<{width}}{detail}".rstrip()
        out.print(line, style=_STYLES[change.op], markup=False)
    out.print(
        f"Plan: {plan.count('create')} to create, {plan.count('update')} to update, "
        f"{plan.count('delete')} to delete, {plan.count('unchanged')} unchanged.",
        markup=False,
    )


def execute(client: Client, plan: Plan, done: dict[str, int], console: Console) -> None:
    rounds = _rounds(client, plan)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("applying", total=sum(len(r) for r in rounds))
        for round_ in rounds:
            _run_round(round_, done, progress, task)


def _run_round(steps: list[Step], done: dict[str, int], progress: Progress, task: Any) -> None:
    """Runs a round's steps in order. A step answered 422 is tried again once the others
    have run (a blueprint's mirror property may follow a relation another blueprint of
    the plan adds), until a pass makes no progress."""
    pending = steps
    while pending:
        deferred: list[tuple[Step, ApiError]] = []
        for step in pending:
            progress.update(task, description=step.label)
            try:
                step.call()
            except ApiError as exc:
                if exc.status == 422 and len(pending) > 1:
                    deferred.append((step, exc))
                    continue
                raise ApplyFailed(step.label, exc) from exc
            if step.counts_as:
                done[step.counts_as] += 1
            progress.advance(task)
        if deferred and len(deferred) == len(pending):
            first, error = deferred[0]
            raise ApplyFailed(first.label, error) from error
        pending = [step for step, _ in deferred]


def _rounds(client: Client, plan: Plan) -> list[list[Step]]:
    """The plan's writes as API calls, in rounds run one after another: new blueprints
    (bare when they have relations), blueprints in full, scorecards, actions, deletions."""
    rounds: list[list[Step]] = [[], [], [], [], [], []]
    by_kind = {"blueprint": 0, "scorecard": 2, "action": 3, "workflow": 4}
    deletes: dict[str, list[Change]] = {
        "workflow": [],
        "action": [],
        "scorecard": [],
        "blueprint": [],
    }
    for change in plan.changes:
        if change.op == "unchanged":
            continue
        if change.op == "delete":
            deletes[change.kind].append(change)
            continue
        desired = change.desired
        assert desired is not None
        if change.kind == "blueprint" and change.op == "create" and canonical.is_linked(desired):
            rounds[0].append(_write(client, change, canonical.bare(desired), None, "create"))
            rounds[1].append(_write(client, change, desired, "create", "update"))
        elif change.kind == "blueprint":
            rounds[0 if change.op == "create" else 1].append(
                _write(client, change, desired, change.op, change.op)
            )
        else:
            rounds[by_kind[change.kind]].append(
                _write(client, change, desired, change.op, change.op)
            )
    rounds[5].extend(_deletions(client, deletes))
    return [r for r in rounds if r]


def _path(change: Change) -> str:
    if change.kind == "blueprint":
        return f"/v1/blueprints/{quote(change.identifier, safe='')}"
    if change.kind == "action":
        return f"/v1/actions/{quote(change.identifier, safe='')}"
    if change.kind == "workflow":
        return f"/v1/workflows/{quote(change.identifier, safe='')}"
    assert change.blueprint is not None
    return (
        f"/v1/blueprints/{quote(change.blueprint, safe='')}/scorecards/"
        f"{quote(change.identifier, safe='')}"
    )


def _collection(change: Change) -> str:
    if change.kind == "scorecard":
        assert change.blueprint is not None
        return f"/v1/blueprints/{quote(change.blueprint, safe='')}/scorecards"
    return {"blueprint": "/v1/blueprints", "workflow": "/v1/workflows"}.get(
        change.kind, "/v1/actions"
    )


def _write(
    client: Client, change: Change, body: dict[str, Any], counts_as: str | None, method: str
) -> Step:
    def call() -> Any:
        if method == "create":
            return client.post(_collection(change), body)
        return client.put(_path(change), body)

    verb = "link" if counts_as == "create" and method == "update" else method
    return Step(label=f"{verb} {change.label}", call=call, counts_as=counts_as)


def _deletions(client: Client, deletes: dict[str, list[Change]]) -> list[Step]:
    steps: list[Step] = []
    for change in deletes["workflow"] + deletes["action"] + deletes["scorecard"]:
        steps.append(_delete(client, change))
    doomed = {c.identifier for c in deletes["blueprint"]}
    for change in deletes["blueprint"]:
        current = change.current or {}
        targets = {
            item.get("target")
            for section in ("relations", "aggregationProperties")
            for item in (current.get(section) or {}).values()
        }
        if (targets - {change.identifier}) & doomed:
            # Unlinked first, so blueprints of the plan that refer to each other can go.
            unlinked = {**canonical.bare(current)}
            steps.append(_unlink(client, change, unlinked))
    for change in deletes["blueprint"]:
        steps.append(_delete(client, change))
    return steps


def _unlink(client: Client, change: Change, body: dict[str, Any]) -> Step:
    return Step(
        label=f"unlink {change.label}", call=lambda: client.put(_path(change), body), counts_as=None
    )


def _delete(client: Client, change: Change) -> Step:
    return Step(
        label=f"delete {change.label}",
        call=lambda: client.delete(_path(change)),
        counts_as="delete",
    )
