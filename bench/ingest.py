"""Ingest benchmark: C-STORE throughput of ``spine-node serve`` against DCMTK storescp.

The same 512x512 CT instances (a real slice from pydicom-data with fresh UIDs, explicit VR
little endian, about 0.5 MB each) are pushed with DCMTK storescu:

* over one association to ``spine-node serve`` and to ``storescp`` (Nagle off), alternating
  which goes first in each round;
* over ``--parallel`` associations (one storescu process each) to
  ``serve --processes N`` for each N given, and to ``storescp --fork``;
* with ``--compare-with DIR``, also over one association to the ``serve`` of another
  checkout (before/after a change), in the same alternation.

Run from the repository root::

    python -m bench.ingest --instances 500 --rounds 3 --parallel 4 --processes 1 2 4
    git archive --prefix=spine-base/ <revision> | tar -x -C /tmp
    python -m bench.ingest --processes 2 --compare-with /tmp/spine-base

Figures (medians over the rounds) go to bench/RESULTS.md, section "Ingest".
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import (
    REPO,
    cpu_scaling,
    dcmtk_storescp,
    machine,
    median,
    node_serve,
    process_tree_cpu_s,
    push,
    split_into,
    write_ct_series,
    write_section,
)


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.dcm"))


def run_node(work: Path, folders: list[Path], processes: int, expected: int,
             repo: Path | None = None, sync: bool = True) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the serve process tree) for one push to a fresh serve."""
    args = ["--processes", str(processes)] if repo is None else []
    env = {"SPINE_NODE_STORAGE__SYNC_BEFORE_ANSWER": "true" if sync else "false"}
    output = _run_dir(work, "node")
    with node_serve(output, args=args, env=env, repo=repo or REPO) as node:
        cpu_before = process_tree_cpu_s(node.proc.pid)
        seconds = push(folders, node.port, "SPINE_NODE")
        cpu = process_tree_cpu_s(node.proc.pid) - cpu_before
    stored = _count(output / "spool")
    _settle(output)
    if stored != expected:
        raise RuntimeError(f"node stored {stored} instances, expected {expected}")
    return seconds, cpu


def _run_dir(work: Path, kind: str) -> Path:
    """A new output folder for each run: files of earlier runs are kept until the end."""
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    return runs / f"{sum(1 for _ in runs.iterdir()):03d}-{kind}"


def _settle(output: Path) -> None:
    """Wait for the disk and hand the run's page cache back, so runs do not pay for each other.

    Without the sync, the next run competes with the write-back of the last one's 250 MB
    (a run without sync leaves it all dirty). The files are kept until the whole benchmark
    ends, their cached pages dropped instead: deleting them between runs freed thousands of
    inodes, and on ext4 without a journal every file created in the next minutes skips over
    each recently freed inode of its block group (the kernel's ``recently_deleted`` check),
    which cost 0.5-1.4 ms per created file here; keeping the files and their pages made every
    run copy into never-used memory, which on a virtual machine costs the host a page fault
    per page (both receivers ran at half speed).
    """
    os.sync()
    for path in output.rglob("*"):
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_storescp(work: Path, folders: list[Path], expected: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of storescp and its children) for one push."""
    output = _run_dir(work, "storescp")
    with dcmtk_storescp(output, fork=len(folders) > 1) as scp:
        cpu_before = process_tree_cpu_s(scp.proc.pid)
        seconds = push(folders, scp.port, "STORESCP")
        cpu = process_tree_cpu_s(scp.proc.pid) - cpu_before
    stored = sum(1 for p in output.iterdir() if p.is_file())
    _settle(output)
    if stored != expected:
        raise RuntimeError(f"storescp stored {stored} instances, expected {expected}")
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4, help="associations in the parallel runs")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4],
                        help="serve --processes values for the parallel runs")
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="another checkout whose serve also runs over one association")
    parser.add_argument("--sync", choices=["both", "on", "off"], default="both",
                        help="run the node with storage.sync_before_answer on, off or both")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    opts = parser.parse_args()
    syncs = {"both": [True, False], "on": [True], "off": [False]}[opts.sync]

    def label(sync: bool) -> str:
        return "sync on" if sync else "sync off"

    # key -> (row label, associations, how to run it)
    plan: dict[str, tuple[str, int, Any]] = {}
    for sync in syncs:
        plan[f"node1-{sync}"] = (f"spine-node serve ({label(sync)})", 1,
                                 lambda w, s, p, sync=sync: run_node(w, s, 1, opts.instances, sync=sync))
    if opts.compare_with:
        plan["base1"] = (f"spine-node serve, other checkout ({opts.compare_with.name})", 1,
                         lambda w, s, p: run_node(w, s, 1, opts.instances, repo=opts.compare_with))
    plan["scp1"] = ("DCMTK storescp (TCP_NODELAY=1)", 1,
                    lambda w, s, p: run_storescp(w, s, opts.instances))
    for sync in syncs:
        for processes in opts.processes:
            plan[f"nodep{processes}-{sync}"] = (
                f"spine-node serve --processes {processes} ({label(sync)})", opts.parallel,
                lambda w, s, p, n=processes, sync=sync: run_node(w, p, n, opts.instances, sync=sync))
    plan["scpp"] = ("DCMTK storescp --fork (TCP_NODELAY=1)", opts.parallel,
                    lambda w, s, p: run_storescp(w, p, opts.instances))

    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="spine-bench-ingest-"))
    try:
        files = write_ct_series(work / "data" / "all", opts.instances, "ingest")
        total_bytes = sum(p.stat().st_size for p in files)
        size_mb = total_bytes / 1e6
        # Every run's files stay until the end (see _settle): check there is room for all.
        needed = total_bytes * len(plan) * opts.rounds * 1.05
        free = shutil.disk_usage(work).free
        if free < needed:
            raise SystemExit(f"bench.ingest keeps every run's files until it ends and needs {needed / 1e9:.1f} GB "
                             f"free in {work}; {free / 1e9:.1f} GB are free (use --work-dir, fewer --rounds "
                             "or --instances)")
        single = split_into(files, 1, work / "data" / "single")
        parallel = split_into(files, opts.parallel, work / "data" / "parallel")
        scaling = [cpu_scaling(2)]
        print(f"CPU calibration: 2 busy processes do {scaling[0]:.2f}x the work of one", flush=True)
        runs: dict[str, list[float]] = {key: [] for key in plan}
        cpu: dict[str, list[float]] = {key: [] for key in plan}
        for round_ in range(opts.rounds):
            # Alternate the order within each round so drift in machine load hits both sides.
            order = list(plan) if round_ % 2 == 0 else list(reversed(plan))
            for key in order:
                seconds, cpu_s = plan[key][2](work, single, parallel)
                runs[key].append(seconds)
                cpu[key].append(cpu_s)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {opts.instances / v[-1]:.0f}/s" for k, v in runs.items()),
                  flush=True)
        scaling.append(cpu_scaling(2))

        def rate(key: str) -> float:
            return opts.instances / median(runs[key])

        def each(key: str) -> str:
            return ", ".join(f"{opts.instances / s:.0f}" for s in runs[key])

        def cpu_ms(key: str) -> str:
            value = median(cpu[key]) / opts.instances * 1e3
            return "-" if value != value else f"{value:.1f}"

        per_mb = size_mb / opts.instances
        lines = ["| receiver | associations | instances/s (median) | MB/s | each round | receiver CPU ms/instance |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for key, (row, associations, _run) in plan.items():
            lines.append(f"| {row} | {associations} | {rate(key):.0f} | {rate(key) * per_mb:.0f} | {each(key)} "
                         f"| {cpu_ms(key)} |")
        table = "\n".join(lines)
        summary = ""
        for sync in syncs:
            summary += (f"- node ({label(sync)}) / storescp, one association: "
                        f"**{rate(f'node1-{sync}') / rate('scp1'):.2f}x** (target >= 1.2x)\n")
        if opts.compare_with:
            summary += f"- node / other checkout, one association: **{rate('node1-True') / rate('base1'):.2f}x**\n"
        for sync in syncs:
            for processes in opts.processes:
                summary += (f"- node ({label(sync)}), {opts.parallel} associations, {processes} receive process(es) "
                            f"/ the same node, one association: "
                            f"**{rate(f'nodep{processes}-{sync}') / rate(f'node1-{sync}'):.2f}x** (target >= 3x)\n")
        summary += (f"- storescp --fork, {opts.parallel} associations / storescp, one association: "
                    f"{rate('scpp') / rate('scp1'):.2f}x\n")
        summary += (f"- CPU calibration in the same session: 2 busy processes did {scaling[0]:.2f}x (before) and "
                    f"{scaling[1]:.2f}x (after) the work of one (2.0x = two free cores)\n")
        print(table)
        print(summary)
        if not opts.no_write:
            write_section("Ingest", (
                f"Command: `python -m bench.ingest --instances {opts.instances} --rounds {opts.rounds} "
                f"--parallel {opts.parallel} --processes {' '.join(map(str, opts.processes))} --sync {opts.sync}"
                + (f" --compare-with {opts.compare_with}" if opts.compare_with else "") + "`\n\n"
                f"Machine: {machine()}.\n\n"
                f"{opts.instances} instances of a real 512x512 CT slice (pydicom-data `693_UNCR.dcm`, "
                f"explicit VR little endian, {per_mb:.2f} MB each), pushed with DCMTK `storescu` "
                "(`TCP_NODELAY=1`), timed from the first storescu start to the last storescu exit. With sync on "
                "(the default, `storage.sync_before_answer = true`) the node answers each C-STORE only after the "
                "file is on disk (fdatasync) and linked into the spool; with sync off, once the operating system "
                "has it, which is what storescp (`-od DIR +xa`) does. Receiver CPU is user + system time of the "
                "serve process and its receive processes (storescp and its forked children) during the push "
                "(from /proc), per instance. Each run "
                "starts a fresh receiver writing into a new folder; after each run the disk is synced (`os.sync`), "
                "so no run pays for the write-back of another, and files are deleted only at the end (freeing "
                "inodes mid-benchmark makes later file creation slow on some file systems); the order of the runs is "
                f"reversed every other round; medians of {opts.rounds} rounds.\n\n{table}\n\n{summary}"))
    finally:
        shutil.rmtree(work if opts.work_dir is None else work / "runs", ignore_errors=True)


if __name__ == "__main__":
    main()
