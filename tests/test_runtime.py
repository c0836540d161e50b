"""Heap settling for servers (app/kit/runtime.py): what lives on leaves the collector's
regular passes, and a periodic full collection still frees what died among it."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from app.kit import runtime


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_settling_moves_what_lives_out_of_the_regular_passes(unfrozen: None) -> None:
    survivor = _Node()
    before = gc.get_freeze_count()
    last_full = runtime.settle_once(now=100.0, last_full=100.0)
    assert last_full == 100.0  # no full collection was due
    assert gc.get_freeze_count() > before
    assert survivor.me is survivor
    # A settled cycle that dies is not freed by the regular passes...
    ref = weakref.ref(survivor)
    del survivor
    gc.collect()
    assert ref() is not None
    # ...but by the next full collection, when it is due.
    last_full = runtime.settle_once(now=100.0 + runtime.FULL_SECONDS, last_full=100.0)
    assert last_full == 100.0 + runtime.FULL_SECONDS
    assert ref() is None
