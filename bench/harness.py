"""Shared pieces of the benchmarks: test data, a real ``serve`` process, DCMTK peers.

Benchmarks run real processes on the local machine (no mocks): ``spine-node serve`` as a
subprocess, DCMTK ``storescu`` as the sender and DCMTK ``storescp`` as the reference
receiver. Timings on a shared machine vary; every benchmark alternates A and B in one run
and reports medians.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from spine_node.node.uids import derive_uid

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
# pynetdicom installs console scripts named storescu/storescp too; the benchmarks use DCMTK's.
DCMTK_DIR = Path(os.environ.get("SPINE_NODE_DCMTK_DIR", "/usr/bin"))


def dcmtk(tool: str) -> str:
    path = DCMTK_DIR / tool
    if not path.is_file():
        raise SystemExit(f"DCMTK {tool} not found in {DCMTK_DIR} (Debian package dcmtk; "
                         "or set SPINE_NODE_DCMTK_DIR)")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine() -> str:
    """A one-line description of where the figures were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        mem_gb = int(re.findall(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[0]) / 2**20
    except (OSError, IndexError):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem_gb:.0f} GiB RAM, no GPU, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
            f"load average {load} (1, 5, 15 min) when the figures were written")


def _spin(iterations: int) -> float:
    start = time.perf_counter()
    total = 0
    for value in range(iterations):
        total += value * value
    return time.perf_counter() - start


def cpu_scaling(processes: int = 2, iterations: int = 3_000_000, repeats: int = 3) -> float:
    """How much more CPU-bound work ``processes`` busy processes get done than one, now.

    2.0 means two free cores. On a shared machine (and with the kernel's autogroup
    scheduling, which shares CPU per session, not per process) it can be far lower; the
    benchmarks print it so parallel figures can be read against it.
    """
    import multiprocessing

    ratios = []
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            pool.map(_spin, [iterations])
            one = time.perf_counter() - start
            start = time.perf_counter()
            pool.map(_spin, [iterations] * processes, chunksize=1)
            many = time.perf_counter() - start
            ratios.append(processes * one / many)
    return statistics.median(ratios)


# -- test data ---------------------------------------------------------------------------
def real_ct_512() -> Dataset:
    """A real 512x512 16-bit CT slice shipped with pydicom-data (693_UNCR.dcm), uncompressed."""
    path = get_testdata_file("693_UNCR.dcm")
    if path is None:
        raise SystemExit("pydicom-data is needed for the 512x512 CT test file (pip install pydicom-data)")
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        ds.decompress()
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    return ds


def write_ct_series(folder: Path, count: int, seed: str, *, start: int = 0) -> list[Path]:
    """``count`` 512x512 CT instances of one series with fresh, deterministic UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    template = real_ct_512()
    study_uid = derive_uid("bench-study", seed)
    series_uid = derive_uid(study_uid, "series")
    # The source file has no Frame of Reference; a CT series needs one (SEG results refer to it).
    template.FrameOfReferenceUID = derive_uid(study_uid, "frame-of-reference")
    x, y, z = (float(v) for v in template.ImagePositionPatient)
    paths = []
    for index in range(start, start + count):
        ds = template
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = derive_uid(series_uid, str(index))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.InstanceNumber = index + 1
        ds.BodyPartExamined = "CSPINE"
        ds.ImagePositionPatient = [x, y, z + 1.0 * index]
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
        paths.append(path)
    return paths


def split_into(paths: Sequence[Path], parts: int, root: Path) -> list[Path]:
    """Hard-link ``paths`` round-robin into ``parts`` folders under ``root``; return them."""
    folders = [root / f"part{i}" for i in range(parts)]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for index, path in enumerate(paths):
        os.link(path, folders[index % parts] / path.name)
    return folders


# -- processes ---------------------------------------------------------------------------
def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid``, its live children and its reaped ones, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, ... utime is field 14 and stime 15 of the full line.
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
        if int(stat.parent.name) == pid:  # children it has waited for (storescp --fork's)
            total += (int(fields[13]) + int(fields[14])) / tick
    return total


@dataclass
class Served:
    port: int
    proc: subprocess.Popen[bytes]
    data_dir: Path


def node_env(data_dir: Path, port: int, extra: dict[str, str] | None = None,
             repo: Path = REPO) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(repo),
        "SPINE_NODE_DICOM__HOST": "127.0.0.1",
        "SPINE_NODE_DICOM__PORT": str(port),
        "SPINE_NODE_STORAGE__DATA_DIR": str(data_dir),
        "SPINE_NODE_STORAGE__MIN_FREE_MB": "0",
        "SPINE_NODE_DATABASE_URL": f"sqlite:///{data_dir / 'node.db'}",
        "SPINE_NODE_WORKER__EMBEDDED": "false",
        "SPINE_NODE_LOG_LEVEL": "WARNING",
        # The benchmarks measure receive; no series should complete mid-run.
        "SPINE_NODE_ASSEMBLY__QUIET_PERIOD_S": "600",
        "SPINE_NODE_ASSEMBLY__STUDY_QUIET_PERIOD_S": "600",
        **(extra or {}),
    }


@contextmanager
def node_serve(data_dir: Path, *, args: Sequence[str] = (), env: dict[str, str] | None = None,
               fresh: bool = True, repo: Path = REPO) -> Iterator[Served]:
    """A real ``spine-node serve`` (``python -m spine_node.node.cli serve``) on a free port.

    ``repo``: the checkout to run (another revision, for before/after comparisons).
    """
    if fresh:
        shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (data_dir / "serve.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "spine_node.node.cli", "serve", *args], cwd=repo,
                            env=node_env(data_dir, port, env, repo), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc)
        yield Served(port, proc, data_dir)
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def dcmtk_storescp(out_dir: Path, fork: bool = False) -> Iterator[Served]:
    """DCMTK storescp with Nagle off (TCP_NODELAY=1), writing every instance to ``out_dir``.

    ``fork``: one child process per association (``--fork``), storescp's way of serving
    several associations at once; without it, associations are served one after another.
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(out_dir), "+xa", *(["--fork"] if fork else []),
         "-pm", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield Served(port, proc, out_dir)
    finally:
        stop_process(proc)


def push(folders: Sequence[Path], port: int, called_ae: str, timeout: float = 600) -> float:
    """Send each folder with its own DCMTK storescu (one association each), in parallel.

    Returns the wall time in seconds until the last storescu exited; raises if one failed.
    """
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", "BENCH", "-aec", called_ae, "+sd", "+r",
                               "127.0.0.1", str(port), str(folder)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for folder in folders]
    errors = []
    for proc in procs:
        _out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-2000:])
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError("storescu failed:\n" + "\n".join(errors))
    return elapsed


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def replace_section(path: Path, begin: str, end: str, section: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` with ``section`` (or append it).

    ``section`` carries its own markers. Other benchmarks' sections and hand-written text
    are kept as they are.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def write_section(name: str, body: str) -> None:
    """Replace (or append) this benchmark's section of bench/RESULTS.md, between markers."""
    begin, end = f"<!-- bench {name}: begin -->", f"<!-- bench {name}: end -->"
    replace_section(RESULTS, begin, end, f"{begin}\n## {name}\n\n{body.strip()}\n{end}\n")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...), read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found
