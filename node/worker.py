"""The worker side of a job: spool series in, pipeline, result objects out.

:func:`execute` is the domain code the ``run_job`` task (defined here) calls once it owns a job: it
builds :class:`~node.domain.SeriesRef` objects from the spool, runs the pipeline with an
:class:`EngineProvider`, encodes the findings with :mod:`spine_node.node.results` and writes the
objects under ``storage.results``. :func:`run_worker` starts a Celery worker with the
node's configuration and keeps its liveness row fresh.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from spine_node.inference import pipelines
from spine_node.inference.errors import InferenceError, PipelineError
from spine_node.inference.findings import Findings
from spine_node.inference.pixels import pixel_budget
from spine_node.inference.runtime import EngineProvider
from spine_node.inference.series import SeriesRef
from spine_node.node import metrics, notices, results, supersede
from spine_node.node.audit import Database, Result, Series, record_event
from spine_node.node.config import Settings, redact_url
from spine_node.node.domain import JobState
from spine_node.node.errors import NodeError, SpoolError
from spine_node.node.jobs import (
    TASK_NAME,
    Claim,
    JobHeartbeat,
    NodeCelery,
    Outcome,
    ResultFile,
    WorkerLiveness,
    celery_app,
    claim_job,
    heartbeat_interval,
    local_host_id,
    node_task,
    queue_names,
    record_failure,
    record_success,
    release_after_error,
)
from spine_node.node.lifetime import wait_for_database
from spine_node.node.spool import Spool
from spine_node.node.uids import validate_uid

log = logging.getLogger(__name__)

_SEG = "1.2.840.10008.5.1.4.1.1.66.4"
_PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


# --- engines -----------------------------------------------------------------------------


_BACKEND_PACKAGES = {"tensorrt": "tensorrt", "onnxruntime": "onnxruntime", "torch": "torch"}


def available_backends(preferred: Sequence[str]) -> list[str]:
    """The backends of ``preferred`` whose package is installed here, in preference order.

    Names may pin a variant (``onnxruntime-cpu``); detection only looks for the package,
    so it never imports torch into the node. Whether a backend really runs a model (a
    GPU for TensorRT) is decided when the engine loads.
    """
    return [name for name in preferred
            if (package := _BACKEND_PACKAGES.get(name.partition("-")[0])) is not None
            and importlib.util.find_spec(package) is not None]


def describe_backends(backends: Sequence[str]) -> list[str]:
    """Human-readable backend list for the worker banner (execution providers included)."""
    described = []
    for name in backends:
        if name.startswith("onnxruntime"):
            import onnxruntime

            providers = ", ".join(p.removesuffix("ExecutionProvider")
                                  for p in onnxruntime.get_available_providers())
            described.append(f"{name} ({providers})")
        else:
            described.append(name)
    return described


_PROVIDERS: dict[tuple[str, tuple[str, ...]], EngineProvider] = {}


def engine_provider(settings: Settings) -> EngineProvider:
    """This process's engine provider (engines stay loaded between jobs)."""
    key = (str(settings.worker.engines_dir), tuple(settings.worker.backends))
    provider = _PROVIDERS.get(key)
    if provider is None:
        provider = _PROVIDERS[key] = EngineProvider.from_settings(settings)
    return provider


def import_pipeline_modules(settings: Settings) -> None:
    """Import the modules in ``worker.pipeline_modules`` so their pipelines register."""
    for module in settings.worker.pipeline_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise PipelineError(f"cannot import pipeline module {module!r}: {exc}") from exc


# --- inputs and outputs ------------------------------------------------------------------


def series_refs(claim: Claim, settings: Settings, db: Database) -> list[SeriesRef]:
    """The job's input series as spool references, each checked to hold instances."""
    spool = Spool(settings.storage.spool)
    with db.session() as session:
        rows = {row.series_uid: row for row in session.scalars(
            select(Series).where(Series.series_uid.in_(claim.input_series_uids)))}
    refs = []
    for uid in claim.input_series_uids:
        row = rows.get(uid)
        study = row.study_uid if row is not None else claim.study_uid
        folder = spool.series_dir(validate_uid(study, "Study Instance UID"),
                                  validate_uid(uid, "Series Instance UID"))
        files = sorted(folder.glob("*.dcm"))
        if not files:
            raise SpoolError(f"series {uid} has no instances in the spool ({folder})")
        if row is not None:
            ref = SeriesRef(study, uid, folder, row.modality, row.body_part, row.view_position,
                            row.sop_class_uid, len(files))
        else:
            header = _read(files[0], headers_only=True)
            ref = SeriesRef(study, uid, folder, str(header.get("Modality", "")),
                            str(header.get("BodyPartExamined", "")),
                            str(header.get("ViewPosition", "")),
                            str(header.get("SOPClassUID", "")), len(files))
        refs.append(ref)
    return refs


def _read(path: Path, headers_only: bool = False) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=headers_only)
    except (InvalidDicomError, OSError, ValueError) as exc:
        # pydicom's message may quote a data element value: its class only.
        raise SpoolError(f"cannot read spooled instance {path.name}: {results.safe_error(exc)}") from exc


def encode_results(findings: Findings, inputs: Sequence[SeriesRef],
                   settings: Settings, db: Database | None = None,
                   claim: Claim | None = None) -> list[Dataset]:
    """Turn ``findings`` into DICOM objects (SEG, SR) with :mod:`spine_node.node.results`.

    Result objects take only the sources' attributes (identity, geometry), never their
    pixels, so the sources are read without pixel data (half the time of SEG encoding
    for a 300-slice CT).
    """
    sources = [_read(path, headers_only=True) for ref in inputs for path in ref.files()]
    # Patient/study values invalid for their VR are left out; the audit names the keywords.
    clean = results.sanitise_sources(sources)
    if clean.changed and db is not None and claim is not None:
        with db.session() as session:
            record_event(session, "result.sanitised", "source attributes with invalid values "
                         "blanked or dropped in the results", job_id=claim.job_id,
                         study_uid=claim.study_uid, series_uid=claim.series_uid,
                         details={"blanked": list(clean.blanked), "dropped": list(clean.dropped)})
    return results.encode(findings, clean.datasets,
                          options=results.ResultsOptions.from_settings(settings))


def result_kind(sop_class_uid: str) -> str:
    if sop_class_uid == _SEG:
        return "SEG"
    if sop_class_uid.startswith(_SR_PREFIX):
        return "SR"
    if sop_class_uid == _PARAMETRIC_MAP:
        return "PMAP"
    return "OTHER"


def write_results(datasets: Sequence[Dataset], results_dir: Path) -> list[ResultFile]:
    """Write each object under ``results_dir`` atomically; describe what was written."""
    paths = results.write_results(datasets, results_dir)
    return [
        ResultFile(result_kind(str(ds.SOPClassUID)), str(ds.SOPClassUID),
                   str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), path)
        for ds, path in zip(datasets, paths, strict=True)
    ]


def execute(claim: Claim, settings: Settings, db: Database) -> Outcome:
    """Run the claimed job's pipeline and write its result objects; return the outcome.

    Raises :class:`NodeError` or :class:`InferenceError` subclasses for failures that are the input's or the
    model's (the job fails with that reason); anything else is a bug.
    """
    started = time.perf_counter()
    import_pipeline_modules(settings)
    try:
        pipeline = pipelines.get(claim.pipeline)
    except KeyError as exc:
        raise PipelineError(str(exc.args[0])) from None
    inputs = series_refs(claim, settings, db)
    loaded = time.perf_counter()
    provider = engine_provider(settings)
    with pixel_budget(settings.worker.max_pixels_per_job):  # checked before decoding (inference/pixels.py)
        findings = pipeline.run(inputs, provider)
    ran = time.perf_counter()
    if not isinstance(findings, Findings):
        raise PipelineError(f"pipeline {claim.pipeline!r} returned {type(findings).__name__}, "
                            "expected Findings")
    datasets = encode_results(findings, inputs, settings, db, claim)
    # A re-run with new UIDs (grown series, other model) names the SR it replaces.
    supersede.add_predecessors(datasets, supersede.prior_reports(db, claim))
    written = write_results(datasets, settings.storage.results)
    done = time.perf_counter()
    backend = findings.model.backend or ",".join(sorted(set(provider.loaded().values())))
    metrics.observe_inference(findings.model.name or claim.pipeline, backend or "unknown", ran - loaded)
    return Outcome(
        results=written,
        backend=backend[:32] or None,
        model_name=findings.model.name[:64] or None,
        model_version=findings.model.version[:32] or None,
        timings={
            "inputs_s": round(loaded - started, 4),
            "pipeline_s": round(ran - loaded, 4),
            "encode_s": round(done - ran, 4),
            "total_s": round(done - started, 4),
        },
    )


def discard_files(db: Database, outcome: Outcome) -> int:
    """Delete the files of a run whose outcome was discarded, except those a recorded
    result points to (a result UID is derived from its inputs, so an earlier recorded run
    over the same inputs wrote the same path). Returns how many were deleted; on a
    database error nothing is deleted (a stray file is better than a missing result)."""
    paths = {str(item.path) for item in outcome.results}
    if not paths:
        return 0
    try:
        with db.session() as session:
            kept = set(session.scalars(select(Result.path).where(Result.path.in_(paths))))
    except Exception:  # noqa: BLE001 - any database error: keep the files
        log.warning("could not check the results of a discarded run; their files are kept",
                    exc_info=True)
        return 0
    removed = 0
    for path in sorted(paths - kept):
        try:
            Path(path).unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s of a discarded run: %s", path, exc)
    return removed


# --- the task ----------------------------------------------------------------------------


@node_task(name=TASK_NAME)
def run_job(self: Any, *, job_id: int) -> str:
    """Claim job ``job_id``, run its pipeline, record the outcome. Returns the new state."""
    app: NodeCelery = self.app
    settings = app.node_settings
    db = app.database()
    claim = claim_job(db, settings, job_id)
    if claim is None:
        return "skipped"
    log.info("job %d (%s) attempt %d started", job_id, claim.pipeline, claim.attempt)
    with JobHeartbeat(db, claim, heartbeat_interval(settings)) as beat:
        try:
            outcome = execute(claim, settings, db)
        except MemoryError:
            # Fails this job only: re-raised, Celery would stop the whole worker
            # ("Unrecoverable error"). What the pipeline held is freed with its frames.
            log.warning("job %d failed: out of memory", job_id)
            record_failure(db, claim, "MemoryError: the pipeline ran out of memory on this input",
                           on_failed=notices.for_claim(db, settings, claim,
                                                       notices.failure_reason(MemoryError())))
            return JobState.FAILED.value
        except (NodeError, InferenceError) as exc:
            log.info("job %d failed: %s", job_id, exc)
            # The job's "analysis not performed" SR is recorded with the failure.
            record_failure(db, claim, f"{type(exc).__name__}: {exc}",
                           on_failed=notices.for_claim(db, settings, claim, notices.failure_reason(exc)))
            return JobState.FAILED.value
        except Exception as exc:
            # Not our own error: its message (pydicom's, highdicom's) may quote a data
            # element value, so only its class and where it came from are kept.
            log.error("job %d: unexpected error: %s", job_id, notices.safe_traceback(exc))
            last = claim.attempt >= settings.worker.max_attempts
            release_after_error(db, settings, claim,
                                f"unexpected {type(exc).__name__} (message withheld)",
                                on_failed=notices.for_claim(db, settings, claim,
                                                            notices.failure_reason(exc)) if last else None)
            # Celery logs what the task raises: the class, never the original message.
            raise RuntimeError(f"job {job_id}: unexpected {type(exc).__name__} "
                               "(message withheld)") from None
    if beat.lost or not record_success(db, settings, claim, outcome):
        removed = discard_files(db, outcome)
        if removed:
            log.info("job %d: %d result file(s) of the discarded run removed", job_id, removed)
        return "discarded"
    log.info("job %d succeeded with %d result(s)", job_id, len(outcome.results))
    return JobState.SUCCEEDED.value


# --- the worker process ------------------------------------------------------------------


def run_worker(settings: Settings, queues: Sequence[str], concurrency: int,
               loglevel: str = "INFO") -> None:
    """Run a Celery worker for ``queues`` until it is stopped (blocks).

    One process (``solo`` pool) when ``concurrency`` is 1, else a prefork pool, or a
    threads pool on the filesystem broker (billiard's prefork pool hangs at exit with
    kombu's filesystem transport). The worker's liveness row is kept fresh while it runs
    and removed when it stops.
    """
    from celery import signals

    unknown = [q for q in queues if q not in queue_names(settings)]
    if unknown:
        raise NodeError(f"unknown queue(s) {unknown}; known: {queue_names(settings)}")
    # highdicom logs every module it copies at INFO: one line per attribute group per job.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    import_pipeline_modules(settings)
    app = celery_app(settings)
    db = app.database()
    # Started before its database (a host booting): wait for it, one line at a time.
    if not wait_for_database(db.is_current, redact_url(settings.database_url)):
        raise NodeError("the database has no schema; run `spine-node db upgrade` first")
    # Unique also among containers that share the host's network and so its name.
    hostname = f"spine-{os.getpid()}@{local_host_id()}"
    backends = available_backends(settings.worker.backends)
    liveness = WorkerLiveness(db, hostname, queues, backends)

    def _ready(**_: Any) -> None:
        liveness.start()

    def _shutdown(**_: Any) -> None:
        liveness.stop()

    signals.worker_ready.connect(_ready, weak=False)
    signals.worker_shutdown.connect(_shutdown, weak=False)
    if concurrency == 1:
        pool = "solo"
    elif settings.broker_url.startswith("filesystem://"):
        pool = "threads"
    else:
        pool = "prefork"
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--hostname={hostname}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if loglevel.upper() != "DEBUG":
        argv.insert(0, "--quiet")  # Celery's start-up banner (a global option): shown at DEBUG only
    import warnings

    from celery.exceptions import SecurityWarning

    if os.geteuid() == 0:
        # Containers commonly run as root; Celery warns about it at length on every start.
        log.debug("worker runs as root (Celery's SecurityWarning silenced)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        app.worker_main(argv)
