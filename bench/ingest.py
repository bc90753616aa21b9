"""Ingest benchmark: C-STORE throughput of ``spine-node serve`` against DCMTK storescp.

The same 512x512 CT instances (a real slice from pydicom-data with fresh UIDs, explicit VR
little endian, about 0.5 MB each) are pushed with DCMTK storescu:

* over one association to ``spine-node serve`` and to ``storescp`` (Nagle off), alternating
  which goes first in each round;
* over ``--parallel`` associations (one storescu process each) to ``serve --processes N``.

Run from the repository root::

    python -m bench.ingest --instances 500 --rounds 3 --parallel 4 --processes 2

Figures (medians over the rounds) go to bench/RESULTS.md, section "Ingest".
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench.harness import (
    dcmtk_storescp,
    machine,
    median,
    node_serve,
    push,
    split_into,
    write_ct_series,
    write_section,
)


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.dcm"))


def run_node(work: Path, folders: list[Path], processes: int, expected: int) -> float:
    args = ["--processes", str(processes)] if processes > 1 else []
    with node_serve(work / "node", args=args) as node:
        seconds = push(folders, node.port, "SPINE_NODE")
    stored = _count(work / "node" / "spool")
    if stored != expected:
        raise RuntimeError(f"node stored {stored} instances, expected {expected}")
    return seconds


def run_storescp(work: Path, folders: list[Path], expected: int) -> float:
    with dcmtk_storescp(work / "storescp") as scp:
        seconds = push(folders, scp.port, "STORESCP")
    stored = sum(1 for p in (work / "storescp").iterdir() if p.is_file())
    if stored != expected:
        raise RuntimeError(f"storescp stored {stored} instances, expected {expected}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4, help="associations in the parallel run")
    parser.add_argument("--processes", type=int, default=2, help="serve --processes for the parallel run")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    opts = parser.parse_args()

    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="spine-bench-ingest-"))
    try:
        files = write_ct_series(work / "data" / "all", opts.instances, "ingest")
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        single = split_into(files, 1, work / "data" / "single")
        parallel = split_into(files, opts.parallel, work / "data" / "parallel")
        node1: list[float] = []
        scp1: list[float] = []
        nodep: list[float] = []
        scpp: list[float] = []
        for round_ in range(opts.rounds):
            order = ["node", "scp"] if round_ % 2 == 0 else ["scp", "node"]
            for who in order:
                if who == "node":
                    node1.append(run_node(work, single, 1, opts.instances))
                else:
                    scp1.append(run_storescp(work, single, opts.instances))
            nodep.append(run_node(work, parallel, opts.processes, opts.instances))
            scpp.append(run_storescp(work, parallel, opts.instances))
            print(f"round {round_ + 1}: node 1 assoc {opts.instances / node1[-1]:.0f}/s, "
                  f"storescp 1 assoc {opts.instances / scp1[-1]:.0f}/s, "
                  f"node {opts.parallel} assoc x {opts.processes} proc {opts.instances / nodep[-1]:.0f}/s, "
                  f"storescp {opts.parallel} assoc {opts.instances / scpp[-1]:.0f}/s", flush=True)

        def rate(seconds: list[float]) -> float:
            return opts.instances / median(seconds)

        def all_rates(seconds: list[float]) -> str:
            return ", ".join(f"{opts.instances / s:.0f}" for s in seconds)

        r_node1, r_scp1, r_nodep, r_scpp = rate(node1), rate(scp1), rate(nodep), rate(scpp)
        table = "\n".join([
            "| receiver | associations | instances/s (median) | MB/s | each round |",
            "| --- | --- | --- | --- | --- |",
            f"| spine-node serve | 1 | {r_node1:.0f} | {r_node1 * size_mb / opts.instances:.0f} | {all_rates(node1)} |",
            f"| DCMTK storescp (TCP_NODELAY=1) | 1 | {r_scp1:.0f} | {r_scp1 * size_mb / opts.instances:.0f} "
            f"| {all_rates(scp1)} |",
            f"| spine-node serve --processes {opts.processes} | {opts.parallel} | {r_nodep:.0f} "
            f"| {r_nodep * size_mb / opts.instances:.0f} | {all_rates(nodep)} |",
            f"| DCMTK storescp (TCP_NODELAY=1) | {opts.parallel} | {r_scpp:.0f} "
            f"| {r_scpp * size_mb / opts.instances:.0f} | {all_rates(scpp)} |",
        ])
        summary = (
            f"- node / storescp, one association: **{r_node1 / r_scp1:.2f}x** (target >= 1.2x)\n"
            f"- node with {opts.parallel} associations and {opts.processes} receive processes / node with one "
            f"association: **{r_nodep / r_node1:.2f}x** (target >= 3x)\n"
        )
        print(table)
        print(summary)
        if not opts.no_write:
            write_section("Ingest", (
                f"Command: `python -m bench.ingest --instances {opts.instances} --rounds {opts.rounds} "
                f"--parallel {opts.parallel} --processes {opts.processes}`\n\n"
                f"Machine: {machine()}.\n\n"
                f"{opts.instances} instances of a real 512x512 CT slice (pydicom-data `693_UNCR.dcm`, "
                f"explicit VR little endian, {size_mb / opts.instances:.2f} MB each), pushed with DCMTK "
                "`storescu` (`TCP_NODELAY=1`), timed from the first storescu start to the last storescu "
                "exit; the node answers each C-STORE only after the file is fsynced and renamed into the "
                "spool, storescp (`-od DIR +xa`) does not fsync. Node and storescp alternate within each "
                f"round; medians of {opts.rounds} rounds.\n\n{table}\n\n{summary}"))
    finally:
        if opts.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
