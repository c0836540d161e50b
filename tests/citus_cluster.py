"""A Citus cluster for tests: Citus built from the vendored source, three local servers.

`ensure_citus()` makes the machine's PostgreSQL able to load Citus: it reuses an installed
build, else installs a cached one, else builds the vendored tarball (configure + make, with
LLVM bitcode off) into a staging tree kept under ~/.cache/portolan/citus/<tarball hash>/ and
copies that tree into PostgreSQL's library and extension directories.

`CitusCluster` initdb's a coordinator and two workers in a temporary directory, each on a
free port on 127.0.0.1 (trust authentication, durability off: test data only), creates a
database with the extension on every node and registers the workers on the coordinator.

`scripts/citus-cluster` runs both from a shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CITUS_VERSION = "13.0.5"
# Debian's packages the build needs (the vendored README's list).
BUILD_PACKAGES = [
    "postgresql-server-dev-15",
    "libcurl4-openssl-dev",
    "liblz4-dev",
    "libzstd-dev",
    "libkrb5-dev",
    "libssl-dev",
]


class CitusUnavailable(RuntimeError):
    """Citus cannot be built or installed on this machine (the message says why)."""


def _pg_config(flag: str) -> str:
    return subprocess.run(
        ["pg_config", flag], check=True, capture_output=True, text=True
    ).stdout.strip()


def tarball() -> Path:
    given = os.environ.get("PORTOLAN_CITUS_TARBALL")
    if given:
        return Path(given)
    return REPO_ROOT.parent / "shared" / "vendor" / f"citus-{CITUS_VERSION}.tar.gz"


def cache_root() -> Path:
    given = os.environ.get("PORTOLAN_CITUS_CACHE")
    if given:
        return Path(given)
    return Path.home() / ".cache" / "portolan" / "citus"


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def installed_version() -> str | None:
    """The Citus version the machine's PostgreSQL would load, if any."""
    library = Path(_pg_config("--pkglibdir")) / "citus.so"
    control = Path(_pg_config("--sharedir")) / "extension" / "citus.control"
    if not library.exists() or not control.exists():
        return None
    for line in control.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "default_version":
            return value.strip().strip("'")
    return None


def _install_build_packages() -> None:
    include = Path(_pg_config("--includedir-server")) / "postgres.h"
    if include.exists() and Path("/usr/include/lz4.h").exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise CitusUnavailable(
            "building Citus needs PostgreSQL's server headers and "
            + " ".join(BUILD_PACKAGES)
            + " (apt-get install them, or set PORTOLAN_CITUS_CACHE to a built tree)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *BUILD_PACKAGES],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _build(source: Path, stage: Path, log: Path) -> None:
    """configure + make + make install into `stage` (a DESTDIR tree)."""
    _install_build_packages()
    work = stage.parent / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with tarfile.open(source) as archive:
        archive.extractall(work, filter="data")
    (tree,) = [p for p in work.iterdir() if p.is_dir()]
    jobs = str(max(os.cpu_count() or 1, 1))
    partial = stage.with_name("stage.partial")
    shutil.rmtree(partial, ignore_errors=True)
    with log.open("w") as out:
        for step in (
            ["./configure"],
            ["make", f"-j{jobs}", "with_llvm=no"],
            ["make", "install", "with_llvm=no", f"DESTDIR={partial}"],
        ):
            done = subprocess.run(step, cwd=tree, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise CitusUnavailable(f"building Citus failed at {' '.join(step)}: see {log}")
    partial.rename(stage)
    shutil.rmtree(work, ignore_errors=True)


def _copy_tree(stage: Path) -> None:
    """Copy the staged files to their places (`stage/usr/...` -> `/usr/...`)."""
    for path in sorted(stage.rglob("*")):
        if path.is_dir():
            continue
        target = Path("/") / path.relative_to(stage)
        if target.exists() and target.read_bytes() == path.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.portolan")
        shutil.copy2(path, temporary)
        temporary.replace(target)


def ensure_citus() -> str:
    """Citus installed into the machine's PostgreSQL: its version (reused when present)."""
    current = installed_version()
    if current is not None and current.startswith(CITUS_VERSION.rsplit(".", 1)[0]):
        return current
    source = tarball()
    if not source.exists():
        raise CitusUnavailable(f"no Citus installed and no source at {source}")
    home = cache_root() / _digest(source)
    home.mkdir(parents=True, exist_ok=True)
    stage = home / "stage"
    with (home / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per tarball
        if not stage.exists():
            _build(source, stage, home / "build.log")
        _copy_tree(stage)
    found = installed_version()
    if found is None:
        raise CitusUnavailable(f"Citus was staged at {stage} but PostgreSQL cannot see it")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, the servers run as `postgres`."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam("postgres")


@dataclass
class Node:
    name: str
    port: int
    data: Path

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


# Small, fast, throwaway servers: the cluster holds test data only.
_SERVER_CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockets}'
shared_preload_libraries = 'citus'
max_connections = 60
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
max_wal_senders = 0
wal_level = minimal
max_worker_processes = 16
citus.node_conninfo = 'sslmode=disable'
log_min_messages = warning
"""


@dataclass
class CitusCluster:
    """A coordinator and two workers on 127.0.0.1; `start()`, then `stop()`."""

    root: Path
    workers: int = 2
    nodes: list[Node] = field(default_factory=list)

    @property
    def coordinator(self) -> Node:
        return self.nodes[0]

    def _run(self, *argv: str) -> None:
        user = _server_user()
        preexec = None
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        if user is not None:
            env["HOME"] = user.pw_dir
            uid, gid = user.pw_uid, user.pw_gid

            def preexec() -> None:
                os.setgid(gid)
                os.setuid(uid)

        subprocess.run(
            argv,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=preexec,
            env=env,
            cwd="/",
        )

    def start(self) -> None:
        bindir = Path(_pg_config("--bindir"))
        self.root.mkdir(parents=True, exist_ok=True)
        user = _server_user()
        if user is not None:
            os.chown(self.root, user.pw_uid, user.pw_gid)
        names = ["coordinator"] + [f"worker{i}" for i in range(1, self.workers + 1)]
        for name in names:
            node = Node(name=name, port=_free_port(), data=self.root / name)
            self._run(
                str(bindir / "initdb"),
                "-D",
                str(node.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
            conf = node.data / "postgresql.conf"
            with conf.open("a") as out:
                out.write(_SERVER_CONF.format(port=node.port, sockets=self.root))
            self.nodes.append(node)
            self._run(
                str(bindir / "pg_ctl"),
                "-D",
                str(node.data),
                "-l",
                str(self.root / f"{name}.log"),
                "-w",
                "-t",
                "60",
                "start",
            )

    def create_database(self, name: str) -> str:
        """A database with Citus on every node, the workers registered: the coordinator's
        URL for it."""
        import asyncio

        import asyncpg

        async def _create() -> None:
            for node in self.nodes:
                admin = await asyncpg.connect(node.url("postgres"))
                try:
                    await admin.execute(f'CREATE DATABASE "{name}"')
                finally:
                    await admin.close()
                conn = await asyncpg.connect(node.url(name))
                try:
                    await conn.execute("CREATE EXTENSION citus")
                finally:
                    await conn.close()
            conn = await asyncpg.connect(self.coordinator.url(name))
            try:
                await conn.execute(
                    "SELECT citus_set_coordinator_host('127.0.0.1', $1)", self.coordinator.port
                )
                for node in self.nodes[1:]:
                    await conn.execute("SELECT citus_add_node('127.0.0.1', $1)", node.port)
            finally:
                await conn.close()

        asyncio.run(_create())
        return self.coordinator.url(name)

    def stop(self) -> None:
        bindir = Path(_pg_config("--bindir"))
        for node in reversed(self.nodes):
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(str(bindir / "pg_ctl"), "-D", str(node.data), "-m", "immediate", "stop")
        self.nodes.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.root.glob("*.log"))
        )


@contextlib.contextmanager
def citus_cluster(workers: int = 2) -> Iterator[CitusCluster]:
    """A started cluster in a temporary directory, stopped and removed afterwards."""
    ensure_citus()
    root = Path(tempfile.mkdtemp(prefix="portolan-citus-"))
    root.chmod(0o711)  # the servers may run as another user (see _server_user)
    cluster = CitusCluster(root=root / "cluster", workers=workers)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
