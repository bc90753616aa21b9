"""The ``spine-node`` command line (typer + rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from node.config import Settings, load_settings, redact_url
from node.errors import NodeError

app = typer.Typer(help="spine-node: a DICOM listener node for spine AI.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (or set SPINE_NODE_CONFIG).",
                 envvar="SPINE_NODE_CONFIG", show_envvar=False),
]


class _State:
    config: Path | None = None


@app.callback()
def _root(config: ConfigOption = None) -> None:
    _State.config = config


def settings() -> Settings:
    """Settings for this invocation; a bad config exits 2 with the reason."""
    try:
        return load_settings(_State.config)
    except NodeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or migrate the schema to the latest revision."""
    from node.db_migrate import upgrade

    cfg = settings()
    upgrade(cfg.database_url, revision)
    console.print(f"database {redact_url(cfg.database_url)} is at revision {revision}")


def main() -> None:
    try:
        app()
    except NodeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
