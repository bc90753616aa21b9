"""Memory benchmark: peak RSS of the receiving ``serve`` process against study and instance size.

Three pushes with DCMTK storescu, each to a fresh ``spine-node serve`` (one receive
process, so the serve process is the receiving process):

* a 50-instance study and a 2000-instance study of 512x512 CT slices (pydicom-data's
  ``693_UNCR.dcm`` with fresh UIDs), one association each;
* one multiframe instance of ``--frames`` 512x512 uint16 frames (1000 frames: 524 MB).

Peak RSS is ``VmHWM`` from /proc/<pid>/status, read right after storescu exits; the
figure after start-up (before any push) is given for reference. Run from the repository
root (needs about 3 GB of free space in the temp folder, deleted afterwards)::

    python -m bench.memory --frames 1000

Figures go to bench/RESULTS.md, section "Memory".
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench.harness import machine, node_serve, push, write_ct_series, write_section
from tests.test_receive_memory import vm_hwm_bytes, write_multiframe_ct


def measure(work: Path, folder: Path, name: str) -> tuple[int, int, float]:
    """(VmHWM after start-up, VmHWM after the push, push seconds) for one fresh serve."""
    with node_serve(work / f"node-{name}") as node:
        idle = vm_hwm_bytes(node.proc.pid)
        seconds = push([folder], node.port, "SPINE_NODE", timeout=1800)
        peak = vm_hwm_bytes(node.proc.pid)
    shutil.rmtree(work / f"node-{name}", ignore_errors=True)
    return idle, peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=50, help="instances in the small study")
    parser.add_argument("--large", type=int, default=2000, help="instances in the large study")
    parser.add_argument("--frames", type=int, default=1000, help="frames of the multiframe instance")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    opts = parser.parse_args()

    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="spine-bench-memory-"))
    rows: list[tuple[str, int, int, int, float]] = []
    try:
        mib = 2**20
        for name, count in (("small", opts.small), ("large", opts.large)):
            folder = work / f"study-{name}"
            files = write_ct_series(folder, count, f"memory-{name}")
            size = sum(p.stat().st_size for p in files)
            idle, peak, seconds = measure(work, folder, name)
            rows.append((f"study of {count} CT instances", size, idle, peak, seconds))
            shutil.rmtree(folder)
            print(rows[-1], flush=True)
        folder = work / "multiframe"
        folder.mkdir()
        write_multiframe_ct(folder / "multiframe.dcm", frames=opts.frames)
        size = (folder / "multiframe.dcm").stat().st_size
        idle, peak, seconds = measure(work, folder, "multiframe")
        rows.append((f"one multiframe instance, {opts.frames} frames of 512x512 uint16", size, idle, peak, seconds))
        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base_peak = rows[0][3]
    lines = ["| pushed | data | serve VmHWM after start | serve VmHWM after push | vs first row | push time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, size, idle, peak, seconds in rows:
        lines.append(f"| {name} | {size / mib:.0f} MiB | {idle / mib:.0f} MiB | {peak / mib:.0f} MiB "
                     f"| {(peak / base_peak - 1) * 100:+.0f}% | {seconds:.1f} s |")
    table = "\n".join(lines)
    print(table)
    if not opts.no_write:
        write_section("Memory", (
            f"Command: `python -m bench.memory --small {opts.small} --large {opts.large} "
            f"--frames {opts.frames}`\n\nMachine: {machine()}.\n\n"
            "Peak resident set (`VmHWM`) of the `spine-node serve` process (one receive process), "
            "each push to a fresh serve over one DCMTK storescu association. Target: flat within 20% "
            f"from the small study to the large study and the multiframe instance.\n\n{table}\n"))


if __name__ == "__main__":
    main()
