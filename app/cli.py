"""The `portolan` command: up, serve, worker, migrate, org, openapi, apply, export, import."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
import typer

from app.config import Settings, get_settings
from app.kit.crypto import cipher_for
from app.kit.logging import configure_logging

if TYPE_CHECKING:
    from app.remote import Client

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="Portolan developer portal")
org_cli = typer.Typer(no_args_is_help=True, help="Organizations (tenants)")
cli.add_typer(org_cli, name="org")
import_cli = typer.Typer(no_args_is_help=True, help="Import catalogs from other tools")
cli.add_typer(import_cli, name="import")

REPO_ROOT = Path(__file__).resolve().parent.parent
OPENAPI_PATH = REPO_ROOT / "openapi" / "openapi.json"
# The starter catalog `portolan up` applies to the demo organization it creates.
STARTER_PATHS = [REPO_ROOT / name for name in ("blueprints", "scorecards", "actions", "workflows")]


def _settings_with_services() -> Settings:
    from app.embedded import ensure_services

    settings = get_settings()
    configure_logging(settings.log_level)
    return ensure_services(settings)


def _migrations_dir() -> Path:
    for candidate in (REPO_ROOT / "migrations", Path.cwd() / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise typer.BadParameter("cannot find the migrations/ directory")


def run_migrations(settings: Settings, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.attributes["sqlalchemy_url"] = settings.sqlalchemy_url
    command.upgrade(cfg, revision)
    if revision == "head":
        asyncio.run(_distribute(settings))


async def _distribute(settings: Settings) -> None:
    """On Citus (PORTOLAN_CITUS), distribute what is not distributed yet (docs/scaling.md)."""
    import asyncpg

    from app.db.citus import citus_enabled, distribute

    conn = await asyncpg.connect(settings.database_url)
    try:
        if not await citus_enabled(conn, settings.citus):
            return
        async with conn.transaction():
            done = await distribute(conn, shard_count=settings.citus_shard_count)
        if done.reference or done.distributed:
            typer.echo(
                f"citus: {len(done.distributed)} tables distributed by org_id, "
                f"{len(done.reference)} reference tables"
            )
    finally:
        await conn.close()


@cli.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    run_migrations(_settings_with_services())
    typer.echo("migrations applied")


def _serve(settings: Settings, host: str, port: int, with_worker: bool, workers: int = 1) -> None:
    import uvicorn

    from app.kit.processes import run_forked
    from app.kit.runtime import settle_heap
    from app.kit.serving import loop_factory, protocol_for
    from app.main import create_app

    app = create_app(settings, with_worker=with_worker)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        proxy_headers=True,
        # HTTP/1.1 with a capped head and deadlines on what the client sends; no WebSocket
        # upgrades (no route takes one).
        http=protocol_for(settings),
        loop=loop_factory(settings),
        ws="none",
        timeout_keep_alive=settings.http_keep_alive_seconds,
    )
    if workers > 1:
        # One listening socket, bound here and shared by the forked processes; each runs
        # the app (and its worker) on its own event loop and connection pool.
        sockets = [config.bind_socket()]

        def child() -> None:
            settle_heap()
            uvicorn.Server(config).run(sockets=sockets)

        run_forked(workers, child)
        return
    settle_heap()
    # uvicorn re-raises the signal it caught once it has shut down; with the default
    # SIGTERM action that would kill the process before atexit stops embedded servers.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(3)  # could not start (e.g. the port is taken), as uvicorn.run exits


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Do not run the in-process worker")
    ] = False,
    workers: Annotated[
        int, typer.Option(min=1, help="Server processes sharing the port (each with its worker)")
    ] = 1,
) -> None:
    """Serve the API (with an in-process worker unless --no-worker)."""
    _serve(_settings_with_services(), host, port, not no_worker, workers)


@cli.command()
def up(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
) -> None:
    """Set up and serve: services (embedded when no URLs), migrations, demo org, API + worker."""
    settings = _settings_with_services()
    run_migrations(settings)
    created = asyncio.run(_ensure_demo_org(settings))
    if created is not None:
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        threading.Thread(
            target=_seed_demo_org,
            args=(f"http://{local}:{port}", created),
            name="seed-demo-org",
            daemon=True,
        ).start()
    _serve(settings, host, port, True)


def _seed_demo_org(url: str, created: dict[str, str]) -> None:
    """Once the server answers, apply the starter catalog to the new demo organization
    through the API, as `portolan apply` would."""
    from app.catalog_code.apply import run
    from app.remote import Client, Credentials

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    credentials = Credentials(
        url=url, client_id=created["clientId"], client_secret=created["clientSecret"]
    )
    typer.echo(
        "Applying the starter catalog (blueprints/, scorecards/, actions/, workflows/) to demo:"
    )
    try:
        with Client(credentials) as client:
            code = run(client, STARTER_PATHS, org=created["orgId"])
    except Exception as exc:  # the server keeps serving; the catalog can be applied later
        typer.echo(f"warning: the starter catalog was not applied: {exc}", err=True)
        return
    finally:
        sys.stdout.flush()
    if code != 0:
        typer.echo("warning: the starter catalog was not fully applied (see above)", err=True)


async def _ensure_demo_org(settings: Settings) -> dict[str, str] | None:
    from app.db.database import Database
    from app.orgs import service

    db = await Database.connect(settings)
    try:
        async with db.system() as tx:
            if await service.count_orgs(tx) > 0:
                typer.echo(
                    "An organization exists already; its credentials were printed when it "
                    "was created."
                )
                return None
            created = await service.create_org(tx, name="demo", cipher=cipher_for(settings))
        creds_file = settings.data_dir / "demo-credentials.json"
        creds_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(creds_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(created.as_dict(), fh, indent=2)
        typer.echo(
            "Created the demo organization. Its credentials (shown once, also saved in "
            f"{creds_file}):"
        )
        typer.echo(json.dumps(created.as_dict(), indent=2))
        sys.stdout.flush()  # the server runs next; a piped stdout must not hold these back
        return created.as_dict()
    finally:
        await db.close()


@cli.command()
def worker() -> None:
    """Run a standalone arq worker."""
    from app.kit.runtime import settle_heap
    from app.worker import run_standalone

    settings = _settings_with_services()
    settle_heap()
    asyncio.run(run_standalone(settings))


@org_cli.command("create")
def org_create(
    name: Annotated[str, typer.Argument(help="Organization name")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Create an organization and its first (Admin) credentials."""
    from app.kit.errors import PortolanError

    settings = _settings_with_services()
    try:
        created = asyncio.run(_create_org(settings, name))
    except PortolanError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(created))
    else:
        typer.echo(f"Organization {created['name']} ({created['orgId']})")
        typer.echo(f"  clientId:     {created['clientId']}")
        typer.echo(f"  clientSecret: {created['clientSecret']}  (shown once)")


async def _create_org(settings: Settings, name: str) -> dict[str, str]:
    from app.db.database import Database
    from app.orgs import service

    db = await Database.connect(settings)
    try:
        async with db.system() as tx:
            created = await service.create_org(tx, name=name, cipher=cipher_for(settings))
        return created.as_dict()
    finally:
        await db.close()


def _remote_client() -> Client:
    from app.remote import Client, Credentials

    try:
        credentials = Credentials.from_env()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from exc
    return Client(credentials)


@cli.command()
def apply(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or directories of blueprints, scorecards, actions")
    ],
    org: Annotated[
        str | None,
        typer.Option(help="Refuse unless the credentials belong to this org (id or name)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; write nothing")
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="Also delete what the files do not define")
    ] = False,
) -> None:
    """Make the org's blueprints, scorecards and actions match files (JSON or YAML).

    Credentials: PORTOLAN_URL, PORTOLAN_CLIENT_ID, PORTOLAN_CLIENT_SECRET. Exit codes: 0
    applied (or nothing to do), 1 a write was refused, 2 invalid files or refused plan
    (nothing written), 3 wrong org, credentials or server (nothing written).
    """
    from app.catalog_code.apply import run

    with _remote_client() as client:
        code = run(client, paths, org=org, dry_run=dry_run, prune=prune)
    raise typer.Exit(code)


class ExportFormat(StrEnum):
    yaml = "yaml"
    json = "json"


@cli.command()
def export(
    directory: Annotated[
        Path, typer.Argument(help="Where to write blueprints/, scorecards/, actions/")
    ],
    org: Annotated[
        str | None,
        typer.Option(help="Refuse unless the credentials belong to this org (id or name)"),
    ] = None,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="File format")] = ExportFormat.yaml,
) -> None:
    """Write the org's blueprints, scorecards and actions as files `portolan apply` reads."""
    from app.catalog_code.export import export as run_export
    from app.catalog_code.plan import org_mismatch
    from app.remote import ApiError

    with _remote_client() as client:
        try:
            if org is not None:
                mismatch = org_mismatch(client.get("/v1/organization")["organization"], org)
                if mismatch:
                    typer.echo(f"error: {mismatch.replace('applied', 'exported')}", err=True)
                    raise typer.Exit(3)
            done = run_export(client, directory, fmt=fmt.value)
        except (ApiError, httpx.HTTPError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(3) from exc
    typer.echo(
        f"Exported {len(done.written)} file(s) of organization {done.organization.get('name')} "
        f"to {directory}" + (f"; removed {len(done.removed)} stale file(s)" if done.removed else "")
    )


def render_openapi() -> str:
    from app.main import create_app

    document = create_app(Settings(_env_file=None)).openapi()
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


@cli.command()
def openapi(
    check: Annotated[bool, typer.Option("--check", help="Fail if the file is stale")] = False,
    path: Annotated[Path, typer.Option(help="Where the document lives")] = OPENAPI_PATH,
) -> None:
    """Write openapi/openapi.json from the app, or verify it is current."""
    rendered = render_openapi()
    if check:
        current = path.read_text() if path.exists() else ""
        if current != rendered:
            typer.echo(f"{path} is stale: run `portolan openapi` and commit it", err=True)
            raise typer.Exit(1)
        typer.echo(f"{path} is current")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rendered)
    typer.echo(f"wrote {path}")


@import_cli.command("backstage")
def import_backstage(
    paths: Annotated[
        list[Path],
        typer.Argument(help="catalog-info.yaml files or directories (searched recursively)"),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report what would change; write nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    url: Annotated[str | None, typer.Option(help="Portolan's URL (default: $PORTOLAN_URL)")] = None,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Delete the entities and workflows an earlier import wrote that the files no "
            "longer hold (teams and users are kept)",
        ),
    ] = False,
    scaffolder_runner_url: Annotated[
        str | None,
        typer.Option(
            "--scaffolder-runner-url",
            help="Where Scaffolder Templates' steps are sent (one WEBHOOK node per step); "
            "without it Templates are reported and not imported",
        ),
    ] = None,
) -> None:
    """Import Backstage catalog files through the API (PORTOLAN_CLIENT_ID / _SECRET)."""
    from app.backstage.importer import import_catalog
    from app.remote import Client, Credentials

    try:
        credentials = Credentials.from_env(url)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    with Client(credentials) as client:
        report = import_catalog(
            client, paths, dry_run=dry_run, runner_url=scaffolder_runner_url, prune=prune
        )
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.render())
    raise typer.Exit(report.exit_code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
