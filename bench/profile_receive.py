"""Profile the receive hot path: cProfile of the association threads of an in-process node.

Pushes ``--instances`` 512x512 CT instances with DCMTK storescu over one association to a
:class:`node.service.NodeService` running in this process, with every association thread
(:class:`node.scp.AssociationHandler`) run under cProfile, and prints the top functions::

    python -m bench.profile_receive --instances 200 --sort tottime
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.harness import free_port, push, write_ct_series
from node.config import load_settings
from node.db_migrate import upgrade
from node.scp import AssociationHandler
from node.service import NodeService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--no-sync", action="store_true", help="storage.sync_before_answer = false")
    opts = parser.parse_args()

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

    work = Path(tempfile.mkdtemp(prefix="spine-bench-profile-"))
    try:
        files = write_ct_series(work / "data", opts.instances, "profile")
        url = f"sqlite:///{work / 'node.db'}"
        upgrade(url)
        settings = load_settings(
            dicom={"host": "127.0.0.1", "port": free_port()},
            storage={"data_dir": work / "node", "min_free_mb": 0, "sync_before_answer": not opts.no_sync},
            database_url=url,
            assembly={"quiet_period_s": 600, "study_quiet_period_s": 600},
        )
        service = NodeService(settings)
        service.start()
        try:
            seconds = push([work / "data"], service.port, "SPINE_NODE")
        finally:
            service.stop()
        print(f"{len(files)} instances in {seconds:.2f}s ({len(files) / seconds:.0f}/s) under the profiler")
        stream = io.StringIO()
        stats = pstats.Stats(*profiles, stream=stream) if profiles else None
        if stats is not None:
            stats.sort_stats(opts.sort).print_stats(opts.top)
        print(stream.getvalue())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
