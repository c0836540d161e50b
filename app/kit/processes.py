"""Serving from several processes: a parent that forks them, keeps them running and stops
them (`portolan serve --workers N`).

The parent binds the listening socket before forking, so the children share it and the
kernel spreads connections between them. A child that dies while the server is not being
stopped is started again (after a pause that grows while children keep dying young). On
SIGTERM or SIGINT the parent passes SIGTERM to every child, waits for them to finish what
they are doing, and returns (its own exit handlers, e.g. stopping embedded services, run
after that). Children leave with `os._exit`: the parent's exit handlers are the parent's.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("portolan.processes")

_RESTART_PAUSE_MAX = 5.0
_YOUNG_SECONDS = 10.0  # a child that dies sooner than this makes the next pause longer


def run_forked(count: int, child: Callable[[], None]) -> None:
    """Run `child()` in `count` forked processes until SIGTERM/SIGINT."""
    children: dict[int, float] = {}  # pid -> started (monotonic)
    stopping = False

    def start() -> None:
        pid = os.fork()
        if pid == 0:  # the child
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            status = 0
            try:
                child()
            except BaseException:
                traceback.print_exc()
                status = 1
            finally:
                os._exit(status)
        children[pid] = time.monotonic()

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    pause = 0.5
    try:
        for _ in range(count):
            start()
        while children:
            try:
                pid, code = os.wait()
            except ChildProcessError:
                break
            started = children.pop(pid, None)
            if started is None:
                continue  # not one of ours (a grandchild reaped elsewhere)
            if stopping:
                continue
            log.error(
                "a server process (pid %d) ended with status %d; starting another",
                pid,
                os.waitstatus_to_exitcode(code),
            )
            young = time.monotonic() - started < _YOUNG_SECONDS
            pause = min(_RESTART_PAUSE_MAX, pause * 2) if young else 0.5
            time.sleep(pause)
            if not stopping:
                start()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
