"""End to end: from the last instance of a 300-slice CT arriving to its SEG and SR in Orthanc.

Runs the embedded single-machine set-up (``spine-node serve`` with SQLite, the filesystem
broker and its embedded worker) with Orthanc as the dispatch destination and the
committed demo weights of ``ct-cspine-fracture``. A synthetic cervical phantom of
``--slices`` 512x512 slices is pushed with DCMTK ``storescu``; the clock starts when
storescu exits (the last C-STORE answered, so the last instance is in the spool) and
stops when Orthanc lists both the SEG and the SR. The stage shares come from the audit
rows (series completion, job created/enqueued/started/finished with the worker's own
timings, dispatch sent_at).

    python -m bench.e2e --slices 300 --quiet-period 5 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from bench.harness import machine, node_serve, push, write_section
from spine_node.node.audit import Dispatch, Job, Series
from tests.orthanc import Orthanc


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def make_series(folder: Path, slices: int, seed: int) -> int:
    from spine_node.inference import phantoms

    phantom = phantoms.generate(seed, region="cervical", shape=(slices, 512, 512),
                                spacing=(0.6, 0.35, 0.35), fractures={"C5": "wedge"})
    return len(phantoms.write_ct_series(phantom, folder, body_part="CSPINE"))


def run_once(work: Path, series_dir: Path, quiet: float) -> dict[str, Any]:
    with Orthanc(work / "orthanc") as pacs:
        env = {
            "SPINE_NODE_WORKER__EMBEDDED": "true",
            "SPINE_NODE_ASSEMBLY__QUIET_PERIOD_S": str(quiet),
            "SPINE_NODE_ASSEMBLY__STUDY_QUIET_PERIOD_S": str(quiet),
            "SPINE_NODE_ASSEMBLY__POLL_INTERVAL_S": "0.5",
            "SPINE_NODE_DISPATCH__DESTINATIONS": json.dumps([{
                "name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}]),
        }
        with node_serve(work / "node", env=env) as node:
            time.sleep(5)  # let the embedded worker come up before the clock matters
            push([series_dir], node.port, "SPINE_NODE")
            last_in = _now()
            t0 = time.perf_counter()
            deadline = t0 + 900
            while time.perf_counter() < deadline:
                found = {i.get("Modality") for i in
                         (pacs.get(f"/instances/{x}/simplified-tags") for x in pacs.get("/instances"))}
                if {"SEG", "SR"} <= found:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError("SEG and SR did not reach Orthanc within 15 minutes")
            total = time.perf_counter() - t0
            engine = create_engine(f"sqlite:///{node.data_dir / 'node.db'}")
            with Session(engine) as session:
                series = session.scalars(select(Series)).one()
                job = session.scalars(select(Job)).one()
                sent = [d.sent_at for d in session.scalars(select(Dispatch)) if d.sent_at]
            engine.dispose()
    if job.state != "succeeded":
        raise RuntimeError(f"job {job.state}: {job.error}")
    timings = job.timings or {}

    def seconds(a: datetime | None, b: datetime | None) -> float:
        return (b - a).total_seconds() if a and b else float("nan")

    return {
        "total_s": total,
        "quiet_wait_s": seconds(last_in, series.completed_at),
        "route_to_start_s": seconds(series.completed_at, job.started_at),
        "load_series_s": float(timings.get("inputs_s", float("nan"))),
        "inference_s": float(timings.get("pipeline_s", float("nan"))),
        "encode_s": float(timings.get("encode_s", float("nan"))),
        "record_s": seconds(job.started_at, job.finished_at) - float(timings.get("total_s", 0.0)),
        "dispatch_s": seconds(job.finished_at, max(sent)) if sent else float("nan"),
        "_backend": job.backend or "",  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--quiet-period", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=880_000_001)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spine-e2e-"))
    try:
        t = time.perf_counter()
        count = make_series(work / "series", opts.slices, opts.seed)
        print(f"phantom CT: {count} slices of 512x512 in {time.perf_counter() - t:.1f}s")
        runs = []
        for index in range(opts.rounds):
            result = run_once(work / f"run{index}", work / "series", opts.quiet_period)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()})
            runs.append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stages = ["quiet_wait_s", "route_to_start_s", "load_series_s", "inference_s", "encode_s",
              "record_s", "dispatch_s"]
    med = {k: statistics.median(r[k] for r in runs) for k in ["total_s", *stages]}
    budget = opts.quiet_period + 20
    rows = "\n".join(f"| {k.removesuffix('_s').replace('_', ' ')} | {med[k]:.2f} | "
                     f"{100 * med[k] / med['total_s']:.0f}% |" for k in stages)
    command = f"python -m bench.e2e --slices {opts.slices} --quiet-period {opts.quiet_period} --rounds {opts.rounds}"
    body = f"""Command: `{command}`
Machine: {machine()}. Embedded set-up (SQLite, filesystem broker, one embedded worker),
Orthanc 1.10 as destination, pipeline `ct-cspine-fracture` on `{runs[0]['_backend']}`, synthetic
{count}-slice 512x512 cervical phantom (demo weights; not for clinical use).

Last instance answered -> SEG and SR listed by Orthanc: **{med['total_s']:.1f} s** (median of
{len(runs)}); target quiet period + 20 s = {budget:.0f} s: **{'met' if med['total_s'] <= budget else 'not met'}**.

| stage | seconds (median) | share |
| --- | ---: | ---: |
{rows}
"""
    print(body)
    if not opts.no_write:
        write_section("end to end: last CT slice in to SEG and SR in Orthanc (bench/e2e.py)", body)


if __name__ == "__main__":
    main()
