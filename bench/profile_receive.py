"""Profile the receive hot path: cProfile of the association threads of an in-process node.

Pushes ``--instances`` 512x512 CT instances with DCMTK storescu over one association to a
:class:`spine_node.node.service.NodeService` running in this process, with every association thread
(:class:`spine_node.node.scp.AssociationHandler`) run under cProfile, and prints the top functions::

    python -m bench.profile_receive --instances 200 --sort tottime

``--timeline`` instead times each C-STORE cycle without a profiler (which would distort
it): the peer's turn (from our answer to its next request), the data phase (request to
last data fragment) and our tail (last fragment to answer sent), as medians::

    python -m bench.profile_receive --instances 500 --no-sync --timeline
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import free_port, push, write_ct_series
from spine_node.node.config import load_settings
from spine_node.node.db_migrate import upgrade
from spine_node.node.scp import AssociationHandler
from spine_node.node.service import NodeService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--no-sync", action="store_true", help="storage.sync_before_answer = false")
    parser.add_argument("--timeline", action="store_true", help="time the parts of each cycle, no profiler")
    opts = parser.parse_args()
    if opts.timeline:
        timeline(opts.instances, not opts.no_sync)
        return

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    owner: Any = AssociationHandler
    original_run = owner.run

    def profiled_run(self: Any) -> None:
        profile = cProfile.Profile()
        with lock:
            profiles.append(profile)
        profile.runcall(original_run, self)

    owner.run = profiled_run

    seconds = push_to_service(opts.instances, not opts.no_sync)
    print(f"{opts.instances} instances in {seconds:.2f}s ({opts.instances / seconds:.0f}/s) under the profiler")
    stream = io.StringIO()
    stats = pstats.Stats(*profiles, stream=stream) if profiles else None
    if stats is not None:
        stats.sort_stats(opts.sort).print_stats(opts.top)
    print(stream.getvalue())


def push_to_service(instances: int, sync: bool) -> float:
    """Push ``instances`` CT slices over one association to a NodeService in this process."""
    work = Path(tempfile.mkdtemp(prefix="spine-bench-profile-"))
    try:
        write_ct_series(work / "data", instances, "profile")
        url = f"sqlite:///{work / 'node.db'}"
        upgrade(url)
        settings = load_settings(
            dicom={"host": "127.0.0.1", "port": free_port()},
            storage={"data_dir": work / "node", "min_free_mb": 0, "sync_before_answer": sync},
            database_url=url,
            assembly={"quiet_period_s": 600, "study_quiet_period_s": 600},
        )
        service = NodeService(settings)
        service.start()
        try:
            return push([work / "data"], service.port, "SPINE_NODE")
        finally:
            service.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timeline(instances: int, sync: bool) -> None:
    """Medians of the parts of a C-STORE cycle, from timestamps taken on the association thread."""
    marks: list[tuple[str, float]] = []
    owner: Any = AssociationHandler
    command, store = owner._command, owner._store

    def timed_command(self: Any, *args: Any) -> None:
        marks.append(("request", time.perf_counter()))
        command(self, *args)

    def timed_store(self: Any, *args: Any) -> None:
        marks.append(("last fragment", time.perf_counter()))
        store(self, *args)

    original_respond = owner._respond

    def timed_respond(self: Any, *args: Any, **kwargs: Any) -> None:
        original_respond(self, *args, **kwargs)
        marks.append(("answered", time.perf_counter()))

    owner._command, owner._store, owner._respond = timed_command, timed_store, timed_respond
    seconds = push_to_service(instances, sync)
    times = {name: [t for n, t in marks if n == name] for name in ("request", "last fragment", "answered")}
    parts = {
        "peer's turn (answer to next request)": zip(times["answered"], times["request"][1:], strict=False),
        "data phase (request to last fragment)": zip(times["request"], times["last fragment"], strict=True),
        "tail (last fragment to answer sent)": zip(times["last fragment"], times["answered"], strict=True),
    }
    print(f"{instances} instances in {seconds:.2f}s ({instances / seconds:.0f}/s), sync {'on' if sync else 'off'}")
    for name, pairs in parts.items():
        spans = sorted((b - a) * 1e3 for a, b in pairs)
        print(f"{name:40s} median {statistics.median(spans):.3f} ms  p90 {spans[int(len(spans) * 0.9)]:.3f} ms")


if __name__ == "__main__":
    main()
