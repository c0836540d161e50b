"""The seam between domains: a write says what changed; the domains that react to it
subscribed at start-up.

A domain that writes (the catalog) reports each change by `await emit(tx, change)` inside
its transaction, and imports none of the domains that react. A domain that reacts
(scorecards today; history, workflows and alerts next) subscribes a handler for the kinds
of change it cares about, in its own `reactions.py`; app/wiring.py connects them all once
per process, before any request or job runs. Handlers run in the writer's transaction, in
the order they subscribed: what they write commits or rolls back with the change, and an
error in one fails the write (a reaction that must not fail a write catches its own).

Work that may wait for the commit (automations, changelog deliveries) does not subscribe
here: it reads the event tables the write also fills (app/automations/feed.py).

Adding a reaction touches the reacting domain (its handler and one line of app/wiring.py).
Adding a kind of change is a dataclass here and an `emit` where the change is written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from app.db.database import Tx

__all__ = [
    "BlueprintChanged",
    "BlueprintDeleted",
    "Change",
    "EntitiesDeleted",
    "EntitiesWritten",
    "NamesChanged",
    "connected",
    "emit",
    "reset",
    "subscribe",
    "unsubscribe",
]


@dataclass(frozen=True, slots=True)
class EntitiesWritten:
    """Entities of `blueprint` (its definition, API shape with `version`) were created or
    changed: `identifiers`, each once."""

    blueprint: dict[str, Any]
    identifiers: list[str]


@dataclass(frozen=True, slots=True)
class EntitiesDeleted:
    """Entities of the blueprint `blueprint` were deleted."""

    blueprint: str
    identifiers: list[str]


@dataclass(frozen=True, slots=True)
class BlueprintChanged:
    """The definition of blueprint `blueprint` changed (replaced, patched, a property or
    relation renamed, or a rename elsewhere carried into it)."""

    blueprint: str


@dataclass(frozen=True, slots=True)
class BlueprintDeleted:
    """Blueprint `blueprint` was deleted (it had no entities left)."""

    blueprint: str


@dataclass(frozen=True, slots=True)
class NamesChanged:
    """Properties or relations (`kind`: "property" / "relation") of blueprint `blueprint`
    were renamed (`renamed`: old, new; their values carried into the entities) or removed
    (`removed`; their values dropped from the entities), without entity events."""

    blueprint: str
    kind: str
    renamed: tuple[tuple[str, str], ...] = ()
    removed: tuple[str, ...] = ()


Change = EntitiesWritten | EntitiesDeleted | BlueprintChanged | BlueprintDeleted | NamesChanged
C = TypeVar("C", EntitiesWritten, EntitiesDeleted, BlueprintChanged, BlueprintDeleted, NamesChanged)
Handler = Callable[["Tx", Any], Awaitable[None]]

_handlers: dict[type, list[Handler]] = {}
_connected = False


def subscribe(kind: type[C], handler: Callable[[Tx, C], Awaitable[None]]) -> None:
    """Run `handler(tx, change)` on every change of `kind`, in the writer's transaction."""
    registered = _handlers.setdefault(kind, [])
    if handler not in registered:
        registered.append(handler)


def unsubscribe(kind: type[C], handler: Callable[[Tx, C], Awaitable[None]]) -> None:
    registered = _handlers.get(kind, [])
    if handler in registered:
        registered.remove(handler)


def connected() -> None:
    """Every reaction has subscribed (app/wiring.py): changes may be emitted."""
    global _connected
    _connected = True


def reset() -> None:
    """Forget every subscription (a process that wires itself again)."""
    global _connected
    _handlers.clear()
    _connected = False


async def emit(tx: Tx, change: Change) -> None:
    """Tell the subscribers of this kind of change, in the writer's transaction."""
    if not _connected:
        # A process that writes without its reactions would silently skip them (scores
        # not updated): refuse instead.
        raise RuntimeError("reactions are not connected: call app.wiring.connect() at start-up")
    for handler in _handlers.get(type(change), ()):
        await handler(tx, change)
