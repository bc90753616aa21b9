"""Route: rules on Modality, BodyPartExamined, ViewPosition and SOP Class UID.

A completed series that matches a rule gets one job per pipeline of the rule; a
study-scoped rule gets one job per study with every matching series as input. A series
that matches nothing is audited as skipped.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from spine_node.node.assemble import CompletedStudy
from spine_node.node.audit import Job, Series, record_event
from spine_node.node.config import Route, RouteMatch, Settings
from spine_node.node.domain import JobState, SeriesState
from spine_node.node.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesFacts:
    """The header values routing looks at."""

    study_uid: str
    series_uid: str
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    sop_class_uid: str = ""


@dataclass(frozen=True)
class PlannedJob:
    route: str
    pipeline: str
    queue: str
    series_uids: tuple[str, ...]

    @property
    def key_series_uid(self) -> str:
        return self.series_uids[0]


def _value_matches(patterns: Sequence[str], value: str) -> bool:
    if not patterns:
        return True
    value = (value or "").strip().upper()
    for pattern in patterns:
        pattern = pattern.strip().upper()
        if pattern == "" and value == "":
            return True
        if pattern and fnmatch.fnmatchcase(value, pattern):
            return True
    return False


def matches(match: RouteMatch, facts: SeriesFacts) -> bool:
    """True if ``facts`` satisfies every non-empty criterion of ``match``."""
    return (
        _value_matches(match.modality, facts.modality)
        and _value_matches(match.body_part, facts.body_part)
        and _value_matches(match.view_position, facts.view_position)
        and (not match.sop_class_uid or facts.sop_class_uid in match.sop_class_uid)
    )


def plan(routes: Iterable[Route], completed: Sequence[SeriesFacts],
         study: Sequence[SeriesFacts] = ()) -> list[PlannedJob]:
    """The jobs that ``completed`` series trigger.

    ``study`` is every finished series of the same study (including ``completed``); it
    feeds study-scoped routes.
    """
    study = study or completed
    jobs: list[PlannedJob] = []
    seen: set[tuple[str, str]] = set()
    for route in routes:
        if route.scope == "series":
            for facts in completed:
                if matches(route.match, facts):
                    for pipeline in route.pipelines:
                        key = (facts.series_uid, pipeline)
                        if key not in seen:
                            seen.add(key)
                            jobs.append(PlannedJob(route.name, pipeline, route.queue, (facts.series_uid,)))
        else:
            if not any(matches(route.match, f) for f in completed):
                continue
            inputs = tuple(sorted(f.series_uid for f in study if matches(route.match, f)))
            for pipeline in route.pipelines:
                key = (inputs[0], pipeline)
                if key not in seen:
                    seen.add(key)
                    jobs.append(PlannedJob(route.name, pipeline, route.queue, inputs))
    return jobs


def _facts(row: Series) -> SeriesFacts:
    return SeriesFacts(row.study_uid, row.series_uid, row.modality, row.body_part,
                       row.view_position, row.sop_class_uid)


def route_study(session: Session, routes: Sequence[Route], completed: CompletedStudy) -> list[Job]:
    """Create or re-arm job rows for a completed study; mark series routed or skipped.

    Runs inside the assembler's transaction, so the job rows are committed with the
    series state change; queue messages are sent only after that commit.
    """
    rows = session.scalars(select(Series).where(Series.study_uid == completed.study_uid)).all()
    finished = [r for r in rows if r.state != SeriesState.RECEIVING.value]
    new_rows = [r for r in finished if r.series_uid in completed.series_uids]
    planned = plan(routes, [_facts(r) for r in new_rows], [_facts(r) for r in finished])
    jobs: list[Job] = []
    for item in planned:
        job = session.scalar(select(Job).where(Job.series_uid == item.key_series_uid,
                                               Job.pipeline == item.pipeline))
        if job is None:
            job = Job(study_uid=completed.study_uid, series_uid=item.key_series_uid,
                      input_series_uids=list(item.series_uids), pipeline=item.pipeline,
                      route=item.route, queue=item.queue, state=JobState.QUEUED.value)
            session.add(job)
            session.flush()
            record_event(session, "job.created", f"pipeline {item.pipeline}", job_id=job.id,
                         study_uid=completed.study_uid, series_uid=item.key_series_uid,
                         details={"route": item.route, "inputs": list(item.series_uids)})
        elif job.state in (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value):
            # New instances arrived after the job ran: run it again on the full series.
            # Result UIDs are derived, so the re-run replaces rather than duplicates.
            job.state = JobState.QUEUED.value
            job.input_series_uids = list(item.series_uids)
            job.enqueued_at = None
            job.task_id = None
            job.attempts = 0
            job.error = None
            record_event(session, "job.requeued", "series received again", job_id=job.id,
                         study_uid=completed.study_uid, series_uid=item.key_series_uid)
        elif job.state == JobState.RUNNING.value:
            # It runs over the instances it found when it started, which this completion
            # has outgrown: take the row from that run (its outcome is then discarded,
            # see jobs.record_success) and queue a run over the full set.
            previous = job.worker
            job.state = JobState.QUEUED.value
            job.input_series_uids = list(item.series_uids)
            job.enqueued_at = None
            job.task_id = None
            job.worker = None
            job.heartbeat_at = None
            job.attempts = 0
            job.error = "superseded: input series received more instances while it ran"
            record_event(session, "job.superseded", "series received again while the job ran",
                         job_id=job.id, study_uid=completed.study_uid,
                         series_uid=item.key_series_uid, details={"worker": previous})
        else:
            # Queued: its worker reads the spool when it starts, so it sees every instance.
            job.input_series_uids = list(item.series_uids)
            continue
        jobs.append(job)
    routed = {uid for item in planned for uid in item.series_uids}
    for row in new_rows:
        if row.series_uid in routed:
            row.state = SeriesState.ROUTED.value
            row.state_reason = None
        else:
            row.state = SeriesState.SKIPPED.value
            row.state_reason = "no route matched"
            record_event(session, "series.skipped", "no route matched",
                         study_uid=row.study_uid, series_uid=row.series_uid,
                         details={"modality": row.modality, "body_part": row.body_part,
                                  "view_position": row.view_position,
                                  "sop_class_uid": row.sop_class_uid})
    if jobs:
        log.info("study %s: %d job(s) queued", completed.study_uid, len(jobs))
    return jobs


# Run by known_pipelines(isolated=True) in a child interpreter: imports the site modules
# (argv) as a worker does, then prints one pipeline name per line, or the module that failed.
_LIST_PIPELINES = """
import importlib, sys
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        sys.exit(f"cannot import worker.pipeline_modules entry {module!r}: {exc}")
from spine_node.inference import pipelines
print("\\n".join(pipelines.names()))
"""


def known_pipelines(settings: Settings, *, isolated: bool = False) -> list[str]:
    """The pipeline names a worker configured by ``settings`` can run.

    The built-in pipelines register when first looked up; ``worker.pipeline_modules``
    (site plug-ins) are imported first, as a worker does. Pipelines import numpy and
    scipy, never torch. ``isolated``: find them in a child interpreter, so that a
    long-lived process (``serve``) does not keep the pipelines' modules (about 20 MiB).
    """
    if isolated:
        import subprocess
        import sys

        done = subprocess.run([sys.executable, "-c", _LIST_PIPELINES, *settings.worker.pipeline_modules],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise ConfigError(f"cannot list the pipelines: {lines[-1]}")
        return done.stdout.split()
    import importlib

    from spine_node.inference import pipelines

    for module in settings.worker.pipeline_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"cannot import worker.pipeline_modules entry {module!r}: {exc}") from None
    return pipelines.names()


def unknown_route_pipelines(settings: Settings, known: Iterable[str]) -> dict[str, list[str]]:
    """Route name -> the pipelines it names that are not ``known``."""
    names = set(known)
    unknown = {route.name: [p for p in route.pipelines if p not in names] for route in settings.routes}
    return {name: missing for name, missing in unknown.items() if missing}


def check_route_pipelines(settings: Settings, *, isolated: bool = False) -> None:
    """Raise :class:`ConfigError` naming any route whose pipeline does not exist."""
    known = known_pipelines(settings, isolated=isolated)
    unknown = unknown_route_pipelines(settings, known)
    if unknown:
        which = "; ".join(f"route {name!r} names unknown pipeline(s) {', '.join(map(repr, missing))}"
                          for name, missing in unknown.items())
        raise ConfigError(f"{which}; known pipelines: {', '.join(known)}")
