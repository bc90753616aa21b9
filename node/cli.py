"""The ``spine-node`` command line (typer + rich)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from node.config import Settings, load_settings, redact_url
from node.errors import NodeError

if TYPE_CHECKING:
    from inference.card import ModelCard, TensorSpec
    from inference.repository import ModelRepository

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


# -- models: the engines/ model repository ------------------------------------------------

models_app = typer.Typer(help="The model repository (engines/): list, show, validate, import.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

EnginesDirOption = Annotated[
    Path | None,
    typer.Option("--engines-dir", help="Model repository (default: worker.engines_dir)."),
]


def _repository(engines_dir: Path | None) -> ModelRepository:
    from inference.repository import ModelRepository

    return ModelRepository(engines_dir if engines_dir is not None
                           else settings().worker.engines_dir)


def _fail(message: object) -> NoReturn:
    """Print ``error: message`` (not parsed as markup, not wrapped) and exit 1."""
    err_console.print(Text.assemble(("error: ", "red"), str(message)), soft_wrap=True)
    raise typer.Exit(1)


def _clinical(card: ModelCard) -> str:
    if card.clinical_use:
        return "[green]yes[/green]"
    return "[bold red]NOT FOR CLINICAL USE[/bold red]"


def _shapes(specs: Sequence[TensorSpec]) -> str:
    def dims(shape: Sequence[int]) -> str:
        return "x".join("?" if d == -1 else str(d) for d in shape)

    return escape(", ".join(f"{s.name} {dims(s.shape)}" for s in specs))


@models_app.command("list")
def models_list(engines_dir: EnginesDirOption = None) -> None:
    """List the models with their task, tensors, provenance and clinical-use flag."""
    from rich.table import Table

    from inference.card import ModelCardError

    repo = _repository(engines_dir)
    table = Table(title=f"models in {repo.root}")
    for column in ("name", "version", "task", "inputs", "outputs", "trained on",
                   "clinical use", "files"):
        table.add_column(column, overflow="fold")
    for folder in repo.folders():
        try:
            card = repo.card(folder.name)
        except ModelCardError as exc:
            table.add_row(escape(folder.name), "", "", "", "", "", "",
                          Text(f"invalid card: {exc}", style="red"))
            continue
        files = [f.split(".")[1] for f in ("model.onnx", "model.pt") if (folder / f).is_file()]
        plans = list((folder / "plans").glob("*.plan"))
        if plans:
            files.append(f"{len(plans)} plan(s)")
        table.add_row(card.name, escape(card.version), card.task, _shapes(card.inputs),
                      _shapes(card.outputs), escape(card.trained_on), _clinical(card),
                      ", ".join(files))
    if not table.rows:
        console.print(f"no models in {repo.root}")
        return
    console.print(table)


@models_app.command("show")
def models_show(name: str, engines_dir: EnginesDirOption = None) -> None:
    """Show one model's card: provenance, intended use, tensors, labels, files."""
    import json

    from rich.table import Table

    from inference.card import ModelCardError
    from inference.repository import ModelNotFoundError, file_sha256

    repo = _repository(engines_dir)
    try:
        card = repo.card(name)
    except (ModelNotFoundError, ModelCardError) as exc:
        _fail(exc)
    console.print(f"[bold]{card.name}[/bold] version {escape(card.version)} ({card.task})")
    if card.description:
        console.print(Text(card.description))
    console.print(f"clinical use: {_clinical(card)}")
    console.print(Text(f"intended use: {card.intended_use}"))
    provenance = Table(title="provenance (weights)", show_header=False)
    provenance.add_column("field", style="bold")
    provenance.add_column("value")
    for key, value in card.weights.items():
        text = value if isinstance(value, str) else json.dumps(value)
        provenance.add_row(Text(str(key)), Text(text))
    if card.architecture is not None:
        provenance.add_row("architecture", Text(json.dumps(card.architecture)))
    console.print(provenance)
    tensors = Table(title="tensors")
    for column in ("kind", "name", "shape", "dtype"):
        tensors.add_column(column)
    for kind, specs in (("input", card.inputs), ("output", card.outputs)):
        for spec in specs:
            tensors.add_row(kind, Text(spec.name), Text(str(list(spec.shape))), spec.dtype)
    console.print(tensors)
    console.print(Text("labels: " + ", ".join(f"{k}={v}"
                                              for k, v in sorted(card.labels.items()))))
    if card.preprocessing:
        console.print(Text(f"preprocessing: {json.dumps(card.preprocessing)}"))
    files = Table(title=f"files in {card.folder}")
    files.add_column("file")
    files.add_column("size")
    files.add_column("detail")
    if card.onnx_path.is_file():
        files.add_row("model.onnx", f"{card.onnx_path.stat().st_size:,}",
                      f"sha256 {file_sha256(card.onnx_path)}")
    else:
        files.add_row("model.onnx", "[red]missing[/red]", "")
    if card.state_dict_path.is_file():
        files.add_row("model.pt", f"{card.state_dict_path.stat().st_size:,}",
                      "torch reference weights")
    for plan in sorted((card.folder / "plans").glob("*.plan")):
        sidecar = plan.with_suffix(".json")
        detail: str | Text = ""
        if sidecar.is_file():
            try:
                info = json.loads(sidecar.read_text(encoding="utf-8"))
                detail = Text(f"built {info.get('built_at', '?')} on {info.get('gpu', '?')}, "
                              f"onnx sha256 {str(info.get('onnx_sha256', '?'))[:12]}")
            except ValueError:
                detail = "unreadable sidecar"
        files.add_row(Text(f"plans/{plan.name}"), f"{plan.stat().st_size:,}", detail)
    console.print(files)


@models_app.command("validate")
def models_validate(
    name: Annotated[str | None, typer.Argument(help="One model (default: all).")] = None,
    engines_dir: EnginesDirOption = None,
) -> None:
    """Check cards and ONNX graphs agree (names, shapes, dtypes); exit 1 if any fails."""
    from rich.table import Table

    from inference.repository import ModelNotFoundError

    repo = _repository(engines_dir)
    try:
        reports = [repo.validate(name)] if name else repo.validate_all()
    except ModelNotFoundError as exc:
        _fail(exc)
    if not reports:
        console.print(f"no models in {repo.root}")
        return
    table = Table(title=f"validation of {repo.root}")
    table.add_column("model")
    table.add_column("result")
    table.add_column("problems")
    for report in reports:
        table.add_row(escape(report.name),
                      "[green]ok[/green]" if report.ok else "[red]invalid[/red]",
                      Text("\n".join(report.problems)))
    console.print(table)
    if not all(report.ok for report in reports):
        raise typer.Exit(1)


@models_app.command("import")
def models_import(
    onnx: Annotated[Path, typer.Argument(help="The ONNX model file.")],
    card: Annotated[Path, typer.Option("--card", help="The model card (model.yaml).")],
    state_dict: Annotated[
        Path | None,
        typer.Option("--state-dict", help="Torch state dict for the reference backend."),
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a model of that name.")]
    = False,
    engines_dir: EnginesDirOption = None,
) -> None:
    """Validate a card against an ONNX file and copy both into the repository."""
    from inference.repository import ModelImportError

    repo = _repository(engines_dir)
    try:
        imported = repo.import_model(onnx, card, state_dict=state_dict, replace=replace)
    except ModelImportError as exc:
        _fail(exc)
    console.print(Text(f"imported {imported.name} version {imported.version} into "
                       f"{imported.folder}"), soft_wrap=True)
    if not imported.clinical_use:
        console.print("[bold red]NOT FOR CLINICAL USE[/bold red] (clinical_use: false)")


def main() -> None:
    try:
        app()
    except NodeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
