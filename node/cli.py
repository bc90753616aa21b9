"""The ``spine-node`` command line (typer + rich)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.audit import Database
from node.config import Settings, load_settings, redact_url
from node.errors import NodeError

if TYPE_CHECKING:
    from inference.card import ModelCard, TensorSpec
    from inference.repository import ModelRepository
    from node.jobs import QueueStatus

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


# --- worker, jobs, dispatch ---------------------------------------------------------------

jobs_app = typer.Typer(help="Inference jobs: list, inspect, retry, cancel.", no_args_is_help=True)
dispatch_app = typer.Typer(help="Sending results to destinations.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(dispatch_app, name="dispatch")


def _database(cfg: Settings) -> Database:
    db = Database(cfg.database_url)
    if not db.is_current():
        err_console.print("[red]error:[/red] the database has no schema; run "
                          "`spine-node db upgrade` first")
        raise typer.Exit(2)
    return db


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@app.command("worker")
def worker_command(
    queues: Annotated[str | None, typer.Option(
        "--queues", "-Q", help="Comma-separated queues (default: worker.queues).")] = None,
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", "-n", min=1, help="Jobs at once (default: worker.concurrency).")] = None,
) -> None:
    """Run a Celery worker that executes inference jobs."""
    from node.logs import configure_logging
    from node.worker import available_backends, describe_backends, run_worker

    cfg = settings()
    configure_logging(cfg.log_level)
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else cfg.worker.queues
    backends = available_backends(cfg.worker.backends)
    console.print(f"worker: queues {', '.join(names)}; broker {redact_url(cfg.broker_url)}; "
                  f"backends found: {', '.join(describe_backends(backends)) or 'none'}")
    run_worker(cfg, names, concurrency or cfg.worker.concurrency, cfg.log_level.upper())


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option("--state", "-s", help="Only this state.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Newest N jobs.")] = 50,
) -> None:
    """List jobs, newest first."""
    from sqlalchemy import select

    from node.audit import Job
    from node.domain import JobState

    states = [s.value for s in JobState]
    if state is not None and state not in states:
        err_console.print(f"[red]error:[/red] unknown state {state!r}; expected one of "
                          f"{', '.join(states)}")
        raise typer.Exit(2)
    db = _database(settings())
    with db.session() as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Job.state == state)
        rows = session.scalars(query).all()
    table = Table("id", "state", "pipeline", "queue", "attempts", "series", "created",
                  "finished", "error")
    for job in rows:
        table.add_row(str(job.id), job.state, job.pipeline, job.queue, str(job.attempts),
                      job.series_uid, _when(job.created_at), _when(job.finished_at),
                      (job.error or "")[:60])
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: int = typer.Argument(..., help="Job id.")) -> None:
    """Show one job with its results and their dispatches."""
    from sqlalchemy import select

    from node.audit import Dispatch, Job, Result

    db = _database(settings())
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            err_console.print(f"[red]error:[/red] job {job_id} does not exist")
            raise typer.Exit(1)
        results = session.scalars(select(Result).where(Result.job_id == job_id)
                                  .order_by(Result.id)).all()
        dispatches = session.scalars(select(Dispatch).where(
            Dispatch.result_id.in_([r.id for r in results])).order_by(Dispatch.id)).all()
    table = Table("field", "value", show_header=False)
    for name in ("id", "state", "pipeline", "route", "queue", "attempts", "study_uid",
                 "series_uid", "input_series_uids", "worker", "backend", "model_name",
                 "model_version", "task_id", "created_at", "enqueued_at", "started_at",
                 "heartbeat_at", "finished_at", "timings", "error"):
        value = getattr(job, name)
        text = _when(value) if isinstance(value, datetime) else "-" if value is None else str(value)
        table.add_row(name, text)
    console.print(table)
    if results:
        out = Table("result", "kind", "SOP instance UID", "dispatches")
        for result in results:
            sends = ", ".join(f"{d.destination}:{d.state}" for d in dispatches
                              if d.result_id == result.id)
            out.add_row(str(result.id), result.kind, result.sop_instance_uid, sends or "-")
        console.print(out)


@jobs_app.command("retry")
def jobs_retry(job_id: int = typer.Argument(..., help="Job id.")) -> None:
    """Put a failed, cancelled or stuck job back on its queue."""
    from node.jobs import retry_job

    cfg = settings()
    job = retry_job(_database(cfg), cfg, job_id)
    console.print(f"job {job.id} re-queued on {job.queue}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: int = typer.Argument(..., help="Job id.")) -> None:
    """Cancel a queued or running job."""
    from node.jobs import cancel_job

    job = cancel_job(_database(settings()), job_id)
    console.print(f"job {job.id} cancelled")


@jobs_app.command("queues")
def jobs_queues() -> None:
    """Queue depths and live workers."""
    from node.jobs import queue_depths

    cfg = settings()
    status = queue_depths(cfg, _database(cfg))
    console.print(queues_table(status))
    console.print(workers_table(status))


def queues_table(status: QueueStatus) -> Table:
    """Messages on the broker and queued/running jobs in SQL, per queue."""
    table = Table("queue", "broker messages", "queued jobs", "running jobs", title="queues")
    for queue in status.queued:
        depth = status.depths.get(queue)
        table.add_row(queue, "?" if depth is None else str(depth), str(status.queued[queue]),
                      str(status.running.get(queue, 0)))
    return table


def workers_table(status: QueueStatus) -> Table:
    """Live workers from their liveness rows."""
    table = Table("worker", "queues", "backends", "pid", "started", "last seen",
                  title="live workers")
    for w in status.workers:
        table.add_row(w.hostname, ",".join(w.queues), ",".join(w.backends), str(w.pid),
                      _when(w.started_at), _when(w.last_seen))
    if not status.workers:
        table.add_row("none", "", "", "", "", "")
    return table


@dispatch_app.command("list")
def dispatch_list(
    state: Annotated[str | None, typer.Option("--state", "-s", help="Only this state.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Newest N.")] = 50,
) -> None:
    """List dispatches, newest first."""
    from sqlalchemy import select

    from node.audit import Dispatch, Result
    from node.domain import DispatchState

    states = [s.value for s in DispatchState]
    if state is not None and state not in states:
        err_console.print(f"[red]error:[/red] unknown state {state!r}; expected one of "
                          f"{', '.join(states)}")
        raise typer.Exit(2)
    db = _database(settings())
    with db.session() as session:
        query = (select(Dispatch, Result).join(Result, Result.id == Dispatch.result_id)
                 .order_by(Dispatch.id.desc()).limit(limit))
        if state is not None:
            query = query.where(Dispatch.state == state)
        rows = session.execute(query).all()
    table = Table("id", "state", "destination", "attempts", "job", "kind", "next attempt",
                  "sent", "last error")
    for dispatch, result in rows:
        table.add_row(str(dispatch.id), dispatch.state, dispatch.destination,
                      str(dispatch.attempts), str(result.job_id), result.kind,
                      _when(dispatch.next_attempt_at) if dispatch.state == "pending" else "-",
                      _when(dispatch.sent_at), (dispatch.last_error or "")[:60])
    console.print(table)


@dispatch_app.command("retry")
def dispatch_retry(dispatch_id: int = typer.Argument(..., help="Dispatch id.")) -> None:
    """Bring a dead dispatch back to pending (sent on the next tick)."""
    from node.dispatch import retry_dispatch

    row = retry_dispatch(_database(settings()), dispatch_id)
    console.print(f"dispatch {row.id} to {row.destination} is pending again")
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


def _clinical(card: ModelCard) -> str:
    if card.clinical_use:
        return "[green]yes[/green]"
    return "[bold red]NOT FOR CLINICAL USE[/bold red]"


def _shapes(specs: Sequence[TensorSpec]) -> str:
    def dims(shape: Sequence[int]) -> str:
        return "x".join("?" if d == -1 else str(d) for d in shape)

    return ", ".join(f"{s.name} {dims(s.shape)}" for s in specs)


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
            table.add_row(folder.name, "", "", "", "", "", "", f"[red]invalid card: {exc}[/red]")
            continue
        files = [f.split(".")[1] for f in ("model.onnx", "model.pt") if (folder / f).is_file()]
        plans = list((folder / "plans").glob("*.plan"))
        if plans:
            files.append(f"{len(plans)} plan(s)")
        table.add_row(card.name, card.version, card.task, _shapes(card.inputs),
                      _shapes(card.outputs), card.trained_on, _clinical(card), ", ".join(files))
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
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"[bold]{card.name}[/bold] version {card.version} ({card.task})")
    if card.description:
        console.print(card.description)
    console.print(f"clinical use: {_clinical(card)}")
    console.print(f"intended use: {card.intended_use}")
    provenance = Table(title="provenance (weights)", show_header=False)
    provenance.add_column("field", style="bold")
    provenance.add_column("value")
    for key, value in card.weights.items():
        text = value if isinstance(value, str) else json.dumps(value)
        provenance.add_row(str(key), text)
    if card.architecture is not None:
        provenance.add_row("architecture", json.dumps(card.architecture))
    console.print(provenance)
    tensors = Table(title="tensors")
    for column in ("kind", "name", "shape", "dtype"):
        tensors.add_column(column)
    for kind, specs in (("input", card.inputs), ("output", card.outputs)):
        for spec in specs:
            tensors.add_row(kind, spec.name, str(list(spec.shape)), spec.dtype)
    console.print(tensors)
    console.print("labels: " + ", ".join(f"{k}={v}" for k, v in sorted(card.labels.items())))
    if card.preprocessing:
        console.print(f"preprocessing: {json.dumps(card.preprocessing)}")
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
        detail = ""
        if sidecar.is_file():
            try:
                info = json.loads(sidecar.read_text(encoding="utf-8"))
                detail = (f"built {info.get('built_at', '?')} on {info.get('gpu', '?')}, "
                          f"onnx sha256 {str(info.get('onnx_sha256', '?'))[:12]}")
            except ValueError:
                detail = "[red]unreadable sidecar[/red]"
        files.add_row(f"plans/{plan.name}", f"{plan.stat().st_size:,}", detail)
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
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if name and reports[0].card is None and not (repo.root / name).is_dir():
        err_console.print(f"[red]error:[/red] no model {name!r} in {repo.root}")
        raise typer.Exit(1)
    if not reports:
        console.print(f"no models in {repo.root}")
        return
    table = Table(title=f"validation of {repo.root}")
    table.add_column("model")
    table.add_column("result")
    table.add_column("problems")
    for report in reports:
        table.add_row(report.name, "[green]ok[/green]" if report.ok else "[red]invalid[/red]",
                      "\n".join(report.problems))
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
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"imported {imported.name} version {imported.version} into {imported.folder}")
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
