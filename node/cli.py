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


# --------------------------------------------------------------------------- train
# One command per family in inference.train.RECIPES (torch-free registry); the recipe
# module, which imports torch, is imported only when the command runs.
train_app = typer.Typer(help="Train a model family and export it into the model repository.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")


def _train_command(family: str) -> None:
    from inference.train import TrainOptions

    def command(
        data: Annotated[Path | None, typer.Option(
            "--data", help="Public dataset root in the family's layout (default: phantoms).",
            exists=True, file_okay=False)] = None,
        epochs: Annotated[int | None, typer.Option(
            "--epochs", min=1, help="Passes over the data (default: the recipe's).")] = None,
        out: Annotated[Path | None, typer.Option(
            "--out", help="Model repository to write model.yaml + model.onnx into "
            "(default: the package's engines/).", file_okay=False)] = None,
        seed: Annotated[int, typer.Option("--seed", min=0, help="Training seed.")] = 0,
        threads: Annotated[int, typer.Option(
            "--threads", min=1, help="CPU threads for torch.")] = 2,
    ) -> None:
        from inference.train import run

        options = TrainOptions(data=data, epochs=epochs, seed=seed, threads=threads)
        if out is not None:
            options = TrainOptions(data=data, epochs=epochs, seed=seed, threads=threads, out=out)
        summary = run(family, options)
        for card in summary.get("cards", []):
            console.print(f"wrote {card}")
        for key, value in summary.get("metrics", {}).items():
            console.print(f"{key}: {value}")

    return command


def _register_train_commands() -> None:
    from inference.train import RECIPES

    for family, recipe in sorted(RECIPES.items()):
        train_app.command(family, help=recipe.help)(_train_command(family))


_register_train_commands()


def main() -> None:
    try:
        app()
    except NodeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
