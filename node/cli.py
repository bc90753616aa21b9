"""The ``spine-node`` command line (typer + rich)."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from spine_node.node.config import Settings, load_settings, redact_url
from spine_node.node.domain import EVENT_KINDS, DispatchState, JobState, SeriesState, kind_matches
from spine_node.node.errors import NodeError

if TYPE_CHECKING:
    import ssl

    from spine_node.inference.card import ModelCard, TensorSpec
    from spine_node.inference.repository import ModelRepository
    from spine_node.node.jobs import QueueStatus

# Never show local variables in tracebacks: they hold settings with database passwords.
app = typer.Typer(help="spine-node: a DICOM listener node for spine AI.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
series_app = typer.Typer(help="Series in the spool.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
routes_app = typer.Typer(help="Routing rules.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(series_app, name="series")
app.add_typer(audit_app, name="audit")
app.add_typer(routes_app, name="routes")

# Piped output (scripts, logs) gets wide lines so full UIDs are never cut.
console = Console(width=None if sys.stdout.isatty() else 250)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 250)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (or set SPINE_NODE_CONFIG).",
                 envvar="SPINE_NODE_CONFIG", show_envvar=False),
]


class _State:
    config: Path | None = None
    settings: Settings | None = None  # the last loaded, for naming the database in errors


@app.callback()
def _root(config: ConfigOption = None) -> None:
    _State.config = config


def _error(message: object) -> None:
    """Print ``error: message`` on stderr as one line (not parsed as markup: config errors
    name TOML tables such as ``[dicom]``)."""
    err_console.print(Text.assemble(("error: ", "red"), str(message)), soft_wrap=True)


def settings() -> Settings:
    """Settings for this invocation; a bad config exits 2 with the reason."""
    try:
        _State.settings = load_settings(_State.config)
    except NodeError as exc:
        _error(exc)
        raise typer.Exit(2) from None
    return _State.settings


def _database_error(url: str, exc: BaseException) -> NoReturn:
    """A database that cannot be used (server down, bad URL, missing driver): one line, exit 2."""
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    _error(f"cannot use database {redact_url(url)}: {type(exc).__name__}: {first}")
    raise typer.Exit(2)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or migrate the schema to the latest revision."""
    from spine_node.node.db_migrate import upgrade

    cfg = settings()
    try:
        upgrade(cfg.database_url, revision)
    except Exception as exc:  # connection refused, bad credentials, unknown revision, ...
        _database_error(cfg.database_url, exc)
    console.print(f"database {redact_url(cfg.database_url)} is at revision {revision}")


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None


def _database(cfg: Settings):  # type: ignore[no-untyped-def]
    """The node's database for a command that reads it; exits 2 when there is none yet.

    A missing SQLite file is reported, never created: a command run from another folder
    than the node's (the default database is relative: ``./spine-node-data``) must not
    leave an empty database behind.
    """
    from spine_node.node.audit import Database

    path = sqlite_path(cfg.database_url)
    if path is not None and not path.is_file():
        _error(f"no database yet at {path.resolve()}: start 'spine-node serve' (or run "
               "'spine-node db upgrade') first, or name the node's configuration with --config")
        raise typer.Exit(2)
    try:
        db = Database(cfg.database_url)
        current = db.is_current()
    except Exception as exc:  # connection refused, bad credentials, unknown driver, ...
        _database_error(cfg.database_url, exc)
    if not current:
        _error(f"database {redact_url(cfg.database_url)} has no schema; "
               "run 'spine-node db upgrade' (or start 'spine-node serve' once)")
        raise typer.Exit(2)
    return db


@app.command()
def serve(
    migrate: Annotated[bool, typer.Option(help="Apply database migrations at start.")] = True,
    processes: Annotated[int | None, typer.Option(
        "--processes", min=1, max=64,
        help="Receive processes sharing the DICOM port (default: dicom.processes).")] = None,
) -> None:
    """Run the node: DICOM listener, series assembly, routing and housekeeping."""
    import os
    import signal
    import threading

    cfg = settings()
    if processes is not None:
        cfg.dicom.processes = processes
    from spine_node.node.route import check_route_pipelines

    # A route naming no pipeline would fail every job it makes. Checked in a child process:
    # serve itself never runs a pipeline and need not hold their modules.
    check_route_pipelines(cfg, isolated=True)
    # Metrics from every receive process are summed through files in this folder; it must
    # be set before prometheus_client is first imported (spine_node.node.metrics, via spine_node.node.service).
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(cfg.storage.data_dir / "metrics"))
    Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    from spine_node.node.metrics import prepare_multiprocess_dir

    prepare_multiprocess_dir(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))

    from spine_node.node.audit import Database
    from spine_node.node.db_migrate import upgrade
    from spine_node.node.logs import configure_logging
    from spine_node.node.receive import bind_check
    from spine_node.node.service import NodeService

    configure_logging(cfg.log_level)
    try:
        if migrate:
            upgrade(cfg.database_url)
        db = Database(cfg.database_url)
        if not db.is_current():
            raise NodeError("database has no schema; run 'spine-node db upgrade'")
    except NodeError:
        raise
    except Exception as exc:  # connection refused, bad credentials, ...
        _database_error(cfg.database_url, exc)
    try:
        bind_check(cfg.dicom.host, cfg.dicom.port)
    except OSError as exc:
        err_console.print(f"[red]error:[/red] cannot listen on {cfg.dicom.host}:{cfg.dicom.port}: "
                          f"{exc.strerror}")
        raise typer.Exit(2) from None
    from spine_node.node.service import EmbeddedWorker

    service = NodeService(cfg, db)
    service.start()
    worker = None
    if cfg.worker.embedded:
        worker = EmbeddedWorker(str(_State.config) if _State.config else None)
        worker.start()
    console.print(
        f"[bold]spine-node[/bold] listening as [cyan]{cfg.dicom.ae_title}[/cyan] on "
        f"{cfg.dicom.host}:{service.port}"
        + (f" ({cfg.dicom.processes} receive processes)" if cfg.dicom.processes > 1 else "")
        + (f"; metrics on port {service.metrics_port}" if service.metrics_port is not None else "")
        + f"; data in {cfg.storage.data_dir}; "
        f"database {redact_url(cfg.database_url)}; broker {redact_url(cfg.broker_url)}"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    console.print("stopping...")
    if worker is not None:
        worker.stop()
    service.stop()


def _check_state(state: str | None, states: type[StrEnum]) -> None:
    """Exit 2 naming the choices if ``state`` is not one of ``states``."""
    values = [s.value for s in states]
    if state is not None and state not in values:
        _error(f"unknown state {state!r}; expected one of {', '.join(values)}")
        raise typer.Exit(2)


def _states_help(states: type[StrEnum]) -> str:
    return "Only this state: " + ", ".join(s.value for s in states) + "."


def _age(value) -> str:  # type: ignore[no-untyped-def]
    from spine_node.node.audit import utcnow

    if value is None:
        return "-"
    seconds = int((utcnow() - value).total_seconds())
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


@app.command()
def status() -> None:
    """Is it up, how full is the spool, what is in flight, jobs by state."""
    import shutil

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
    from rich.table import Table
    from sqlalchemy import func, select

    from spine_node.node.audit import Association, Job, Series
    from spine_node.node.spool import Spool

    cfg = settings()
    db = _database(cfg)
    ae = AE(ae_title="SPINE_STATUS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    host = "127.0.0.1" if cfg.dicom.host in ("0.0.0.0", "::") else cfg.dicom.host
    tls_args = None
    if cfg.dicom.tls.enabled:
        from spine_node.node.receive import probe_ssl_context

        # pynetdicom takes None for "no server name to check" (its hint says str).
        tls_args = cast("tuple[ssl.SSLContext, str]", (probe_ssl_context(cfg.dicom.tls), None))
    assoc = ae.associate(host, cfg.dicom.port, ae_title=cfg.dicom.ae_title, tls_args=tls_args)
    up = False
    if assoc.is_established:
        rsp = assoc.send_c_echo()
        up = bool(rsp and rsp.Status == 0)
        assoc.release()
    spool = Spool(cfg.storage.spool)
    usage = shutil.disk_usage(spool.root)
    table = Table(title="spine-node status", show_header=False)
    table.add_row("listener", f"[green]up[/green] (C-ECHO ok on {host}:{cfg.dicom.port})" if up
                  else f"[red]down[/red] (no C-ECHO answer on {host}:{cfg.dicom.port})")
    table.add_row("spool", f"{spool.size_bytes() / 2**20:.1f} MiB used, "
                  f"{usage.free / 2**30:.1f} GiB free (floor {cfg.storage.min_free_mb} MiB)")
    with db.session() as session:
        by_state = dict(session.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        last_assoc = session.scalar(select(func.max(Association.started_at)))
    table.add_row("series", ", ".join(f"{k}: {v}" for k, v in sorted(by_state.items())) or "none")
    table.add_row("jobs", ", ".join(f"{k}: {v}" for k, v in sorted(jobs.items())) or "none")
    table.add_row("last association", _age(last_assoc))
    table.add_row("database", redact_url(cfg.database_url))
    table.add_row("broker", redact_url(cfg.broker_url))
    console.print(table)
    from spine_node.node.jobs import queue_depths

    try:
        queue_status = queue_depths(cfg, db)
    except Exception as exc:  # a broker that is down must not hide the rest
        err_console.print(f"[yellow]queues unavailable:[/yellow] {type(exc).__name__}")
    else:
        console.print(queues_table(queue_status))
        console.print(workers_table(queue_status))
    if not up:
        raise typer.Exit(1)


@series_app.command("list")
def series_list(
    state: Annotated[str | None, typer.Option(help=_states_help(SeriesState))] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
) -> None:
    """Series, newest first."""
    from rich.table import Table
    from sqlalchemy import select

    from spine_node.node.audit import Series

    _check_state(state, SeriesState)
    db = _database(settings())
    query = select(Series).order_by(Series.last_received_at.desc()).limit(limit)
    if state:
        query = query.where(Series.state == state)
    table = Table("series UID", "study UID", "modality", "body part", "view", "instances",
                  "state", "last instance")
    for column in table.columns[:2]:
        column.overflow = "fold"
    with db.session() as session:
        for row in session.scalars(query):
            table.add_row(row.series_uid, row.study_uid, row.modality, row.body_part,
                          row.view_position, str(row.instance_count),
                          row.state + (f" ({row.state_reason})" if row.state_reason else ""),
                          _age(row.last_received_at))
    console.print(table)


@audit_app.command("tail")
def audit_tail(
    lines: Annotated[int, typer.Option("-n", help="Number of events.")] = 30,
    kind: Annotated[str | None, typer.Option(
        help="Only events of this kind, or of kinds starting with it (job, job.failed, ...): "
        + ", ".join(EVENT_KINDS) + ".")] = None,
) -> None:
    """The latest audit events."""
    from rich.table import Table
    from sqlalchemy import select

    from spine_node.node.audit import AuditEvent

    if kind is not None and not kind_matches(kind):
        _error(f"unknown audit event kind {kind!r}; expected one of {', '.join(EVENT_KINDS)} "
               "or a prefix of one (e.g. job)")
        raise typer.Exit(2)
    db = _database(settings())
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(lines)
    if kind:
        query = query.where(AuditEvent.kind.startswith(kind))
    table = Table("at", "kind", "message", "series / job")
    with db.session() as session:
        rows = list(session.scalars(query))
    for row in reversed(rows):
        ref = row.series_uid or (f"job {row.job_id}" if row.job_id else "") or (
            f"assoc {row.association_id}" if row.association_id else "")
        table.add_row(row.at.strftime("%Y-%m-%d %H:%M:%S"), row.kind, row.message, ref)
    console.print(table)


@routes_app.command("test")
def routes_test(
    path: Annotated[Path, typer.Argument(help="A DICOM file or a folder of them.", exists=True)],
) -> None:
    """Show which routes and pipelines the series in PATH would trigger."""
    from rich.table import Table

    from spine_node.node.header import StoreRejected, read_header
    from spine_node.node.route import SeriesFacts, check_route_pipelines, plan

    cfg = settings()
    check_route_pipelines(cfg)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    series: dict[str, SeriesFacts] = {}
    counts: dict[str, int] = {}
    unreadable = 0
    for file in files:
        try:
            info = read_header(file)
        except StoreRejected:
            unreadable += 1
            continue
        series.setdefault(info.series_uid, SeriesFacts(
            info.study_uid, info.series_uid, info.modality, info.body_part,
            info.view_position, info.sop_class_uid))
        counts[info.series_uid] = counts.get(info.series_uid, 0) + 1
    table = Table("series UID", "modality", "body part", "view", "instances", "pipelines (route)")
    by_study: dict[str, list[SeriesFacts]] = {}
    for facts in series.values():
        by_study.setdefault(facts.study_uid, []).append(facts)
    for study_series in by_study.values():
        planned = plan(cfg.routes, study_series, study_series)
        for facts in study_series:
            hits = [f"{p.pipeline} ({p.route})" for p in planned if facts.series_uid in p.series_uids]
            table.add_row(facts.series_uid, facts.modality, facts.body_part, facts.view_position,
                          str(counts[facts.series_uid]),
                          "\n".join(hits) if hits else "[yellow]none: skipped[/yellow]")
    console.print(table)
    if unreadable:
        err_console.print(f"{unreadable} file(s) were not readable DICOM and were ignored")


pipelines_app = typer.Typer(help="Inference pipelines: the names routes can give.", no_args_is_help=True)
app.add_typer(pipelines_app, name="pipelines")


@pipelines_app.command("list")
def pipelines_list() -> None:
    """Every pipeline a worker can run: the models it uses and the routes that reach it."""
    from spine_node.inference import pipelines
    from spine_node.node.route import known_pipelines, unknown_route_pipelines

    cfg = settings()
    known = known_pipelines(cfg)
    table = Table("pipeline", "models", "routes", title="pipelines")
    for name in known:
        routes = [route.name for route in cfg.routes if name in route.pipelines]
        table.add_row(name, ", ".join(pipelines.model_names(name)) or "-",
                      ", ".join(routes) or "[dim]none[/dim]")
    console.print(table)
    unknown = unknown_route_pipelines(cfg, known)
    if unknown:
        for route, missing in unknown.items():
            _error(f"route {route!r} names unknown pipeline(s) {', '.join(map(repr, missing))}")
        raise typer.Exit(2)


# -- models: the engines/ model repository ------------------------------------------------

models_app = typer.Typer(help="The model repository (engines/): list, show, validate, import.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

EnginesDirOption = Annotated[
    Path | None,
    typer.Option("--engines-dir", help="Model repository (default: worker.engines_dir)."),
]


def _repository(engines_dir: Path | None) -> ModelRepository:
    from spine_node.inference.repository import ModelRepository

    return ModelRepository(engines_dir if engines_dir is not None
                           else settings().worker.engines_dir)


def _fail(message: object) -> NoReturn:
    """Print ``error: message`` (not parsed as markup, not wrapped) and exit 2."""
    _error(message)
    raise typer.Exit(2)


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

    from spine_node.inference.card import ModelCardError

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

    from spine_node.inference.card import ModelCardError
    from spine_node.inference.repository import ModelNotFoundError, file_sha256

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

    from spine_node.inference.repository import ModelNotFoundError

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
    from spine_node.inference.repository import ModelImportError

    repo = _repository(engines_dir)
    try:
        imported = repo.import_model(onnx, card, state_dict=state_dict, replace=replace)
    except ModelImportError as exc:
        _fail(exc)
    console.print(Text(f"imported {imported.name} version {imported.version} into "
                       f"{imported.folder}"), soft_wrap=True)
    if not imported.clinical_use:
        console.print("[bold red]NOT FOR CLINICAL USE[/bold red] (clinical_use: false)")


# --- worker, jobs, dispatch ---------------------------------------------------------------

jobs_app = typer.Typer(help="Inference jobs: list, inspect, retry, cancel.", no_args_is_help=True)
dispatch_app = typer.Typer(help="Sending results to destinations.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(dispatch_app, name="dispatch")


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
    from spine_node.node.logs import configure_logging
    from spine_node.node.worker import available_backends, describe_backends, run_worker

    cfg = settings()
    configure_logging(cfg.log_level)
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else cfg.worker.queues
    backends = available_backends(cfg.worker.backends)
    console.print(f"worker: queues {', '.join(names)}; broker {redact_url(cfg.broker_url)}; "
                  f"backends found: {', '.join(describe_backends(backends)) or 'none'}")
    run_worker(cfg, names, concurrency or cfg.worker.concurrency, cfg.log_level.upper())


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option("--state", "-s", help=_states_help(JobState))] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Newest N jobs.")] = 50,
) -> None:
    """List jobs, newest first."""
    from sqlalchemy import select

    from spine_node.node.audit import Job
    from spine_node.node.domain import JobState

    _check_state(state, JobState)
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

    from spine_node.node.audit import Dispatch, Job, Result

    db = _database(settings())
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            _error(f"job {job_id} does not exist")
            raise typer.Exit(2)
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
    from spine_node.node.jobs import retry_job

    cfg = settings()
    job = retry_job(_database(cfg), cfg, job_id)
    console.print(f"job {job.id} re-queued on {job.queue}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: int = typer.Argument(..., help="Job id.")) -> None:
    """Cancel a queued or running job."""
    from spine_node.node.jobs import cancel_job

    job = cancel_job(_database(settings()), job_id)
    console.print(f"job {job.id} cancelled")


@jobs_app.command("queues")
def jobs_queues() -> None:
    """Queue depths and live workers."""
    from spine_node.node.jobs import queue_depths

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
    state: Annotated[str | None, typer.Option("--state", "-s", help=_states_help(DispatchState))] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Newest N.")] = 50,
) -> None:
    """List dispatches, newest first."""
    from sqlalchemy import select

    from spine_node.node.audit import Dispatch, Result
    from spine_node.node.domain import DispatchState

    _check_state(state, DispatchState)
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
    from spine_node.node.dispatch import retry_dispatch

    row = retry_dispatch(_database(settings()), dispatch_id)
    console.print(f"dispatch {row.id} to {row.destination} is pending again")


# --------------------------------------------------------------------------- train
# One command per family in spine_node.inference.train.RECIPES (torch-free registry); the recipe
# module, which imports torch, is imported only when the command runs.
train_app = typer.Typer(help="Train a model family and export it into the model repository.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")


#: Recipes that can re-run their validation on exported models (``--validate-only``).
VALIDATE_ONLY_RECIPES = ("ct-cspine", "xray", "xray-pair-classifier", "xray-fracture-mobilenet",
                         "xray-cspine-classifier")
#: X-ray recipes that can be fine-tuned (``--init``) and averaged (``--average``).
XRAY_CLASSIFIERS = ("xray-cspine-classifier", "xray-fracture-mobilenet", "xray-pair-classifier")
#: Recipes that can train one of their stages alone (``--stage``), and the stages.
STAGE_RECIPES: dict[str, tuple[str, ...]] = {"ct-cspine": ("all", "fracture", "segmentation")}


def _train_command(family: str) -> Callable[..., None]:
    from spine_node.inference.train import TrainOptions

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
            "--threads", min=1, help="CPU threads for torch; also the processes that "
            "render phantoms.")] = 2,
        budget: Annotated[str, typer.Option(
            "--budget", help="default (sized for 2 CPU cores) or gpu (more data and steps, "
            "for a CUDA GPU and many cores); recipes without budgets ignore it.")] = "default",
        init: Annotated[Path | None, typer.Option(
            "--init", help="Fine-tune: start from the weights (model.pt) in this model "
            "repository instead of from scratch (recipes that support it: ct-cspine and the "
            "X-ray classifiers).",
            exists=True, file_okay=False)] = None,
        validate_only: Annotated[bool, typer.Option(
            "--validate-only", help="Train nothing: run the validation cohort through the "
            "models in --out and the current pipeline, and rewrite the operating points in "
            "their cards (recipes that support it: ct-cspine and the X-ray classifiers).")] = False,
        stage: Annotated[str, typer.Option(
            "--stage", help="all, or one stage to train alone with the others kept as they "
            "are in --out (ct-cspine: fracture, segmentation).")] = "all",
        average: Annotated[list[Path] | None, typer.Option(
            "--average", help="Instead of training, average the weights (model.pt) of these "
            "model repositories, fine-tunes of one model, then validate as training does "
            "(repeat the option; ct-cspine --stage fracture, the X-ray classifiers).", exists=True,
            file_okay=False)] = None,
    ) -> None:
        from dataclasses import replace

        from spine_node.inference.train import run

        if budget not in ("default", "gpu"):
            raise typer.BadParameter(f"--budget must be default or gpu, got {budget!r}")
        if validate_only and family not in VALIDATE_ONLY_RECIPES:
            raise typer.BadParameter(f"--validate-only is supported by "
                                     f"{', '.join(VALIDATE_ONLY_RECIPES)}, not {family}")
        if stage != "all" and stage not in STAGE_RECIPES.get(family, ()):
            known = ", ".join(f"{f}: {', '.join(s[1:])}" for f, s in STAGE_RECIPES.items())
            raise typer.BadParameter(f"--stage {stage} is not a stage of {family} ({known})")
        if average and (family, stage) != ("ct-cspine", "fracture") and family not in XRAY_CLASSIFIERS:
            raise typer.BadParameter("--average is supported by ct-cspine --stage fracture and "
                                     f"the X-ray classifiers ({', '.join(XRAY_CLASSIFIERS)})")
        if average and len(average) < 2:
            raise typer.BadParameter("--average needs at least two model repositories")
        if average and (init is not None or epochs is not None or validate_only):
            raise typer.BadParameter("--average trains nothing: drop --init, --epochs and "
                                     "--validate-only")
        options = TrainOptions(data=data, epochs=epochs, seed=seed, threads=threads, budget=budget,
                               init=init, validate_only=validate_only, stage=stage,
                               average=tuple(average or ()))
        if out is not None:
            options = replace(options, out=out)
        summary = run(family, options)
        for card in summary.get("cards", []):
            console.print(f"wrote {card}")
        for key, value in summary.get("metrics", {}).items():
            console.print(f"{key}: {value}")

    return command


def _register_train_commands() -> None:
    from spine_node.inference.train import RECIPES

    for family, recipe in sorted(RECIPES.items()):
        train_app.command(family, help=recipe.help)(_train_command(family))


_register_train_commands()


LeafConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (or set SPINE_NODE_CONFIG).", show_default=False),
]


def _with_config_option(func: Callable[..., None]) -> Callable[..., None]:
    """``func`` taking ``--config`` too; given there, it wins over the root's."""
    signature = inspect.signature(func, eval_str=True)
    if "config" in signature.parameters:
        return func

    @functools.wraps(func)
    def command(*args: Any, config: Path | None = None, **kwargs: Any) -> None:
        if config is not None:
            _State.config = config
        func(*args, **kwargs)

    extra = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=LeafConfigOption)
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), extra])
    return command


def accept_config_everywhere(typer_app: typer.Typer) -> None:
    """Give every command ``--config`` too, so that it may come after the subcommand
    (``spine-node serve --config node.toml``) as well as before it."""
    for info in typer_app.registered_commands:
        if info.callback is not None:
            info.callback = _with_config_option(info.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            accept_config_everywhere(group.typer_instance)


accept_config_everywhere(app)


def main() -> None:
    from sqlalchemy.exc import SQLAlchemyError

    try:
        app(prog_name="spine-node")
    except NodeError as exc:
        _error(exc)
        raise SystemExit(2) from None
    except SQLAlchemyError as exc:  # a database that went away after the command's first look
        url = _State.settings.database_url if _State.settings is not None else "(unknown)"
        try:
            _database_error(url, exc)
        except typer.Exit as done:
            raise SystemExit(done.exit_code) from None


if __name__ == "__main__":
    main()
