"""`portolan serve --workers N`: N processes share the port, each serving the API on its own
event loop and connection pool; one that dies is started again; SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from app.config import Settings
from tests.conftest import Org, OrgFactory, served


def _children(port: int) -> tuple[int, list[int]]:
    """The parent `serve --port <port>` process and the server processes it forked."""
    processes: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        processes[int(entry)] = (ppid, command)
    mark = f"serve --port {port} "
    ours = {pid for pid, (_, command) in processes.items() if mark in command + " "}
    parents = [pid for pid in ours if processes[pid][0] not in ours]
    assert len(parents) == 1, (ours, parents)
    parent = parents[0]
    return parent, sorted(pid for pid in ours if processes[pid][0] == parent)


def _pids_serving(port: int, org: Org, requests: int) -> None:
    for _ in range(requests):  # a new connection each time: the kernel spreads them
        r = httpx.get(f"http://127.0.0.1:{port}/v1/organization", headers=org.headers)
        assert r.status_code == 200, r.text


async def test_processes_share_the_port_restart_and_stop(
    settings: Settings, make_org: OrgFactory
) -> None:
    _exercise(settings, await make_org())


def _exercise(settings: Settings, org: Org) -> None:
    with served(settings, serve_args=("--workers", "2")) as (port, log):
        parent, children = _children(port)
        assert len(children) == 2, children
        _pids_serving(port, org, 20)
        # One dies: another takes its place, and the API keeps answering meanwhile.
        os.kill(children[0], signal.SIGKILL)
        _pids_serving(port, org, 10)
        deadline = time.monotonic() + 30
        while True:
            _, now = _children(port)
            if len(now) == 2 and children[0] not in now:
                break
            assert time.monotonic() < deadline, (children, now, Path(log).read_text())
            time.sleep(0.2)
        _pids_serving(port, org, 10)
        assert children[1] in now
    # served() sent SIGTERM to the parent and waited for it: no server process is left.
    for pid in (parent, *now):
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True
