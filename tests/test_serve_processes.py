"""Several receive processes on one port: a study over parallel associations arrives whole."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.harness import descendants
from spine_node.node.audit import Association, AuditEvent, Job, Series
from tests.dicom_factory import write_study
from tests.nodeproc import NodeProcess, table_rows, wait_for
from tests.peers import dcmtk, free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def split_round_robin(files: list[Path], parts: int, root: Path) -> list[Path]:
    folders = [root / f"assoc{i}" for i in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True)
    for index, path in enumerate(files):
        os.link(path, folders[index % parts] / path.name)
    return folders


def test_study_over_parallel_associations_to_multiprocess_serve(tmp_path, database_url):
    study = write_study(tmp_path / "in", seed="parallel", series=3, per_series=12)
    files = sorted(p for paths in study.values() for p in paths)
    folders = split_round_robin(files, 4, tmp_path / "split")
    metrics_port = free_port()
    # A quiet period long enough that a slow machine starting four storescu processes does
    # not complete the study between two of them (it would be completed, then received again).
    env = {"SPINE_NODE_METRICS_PORT": str(metrics_port),
           "SPINE_NODE_ASSEMBLY__QUIET_PERIOD_S": "4", "SPINE_NODE_ASSEMBLY__STUDY_QUIET_PERIOD_S": "4"}
    with NodeProcess(tmp_path / "node", database_url, env=env, args=("--processes", "3")) as node:
        # The banner comes after the service's own "3 receive processes listening" line.
        wait_for(lambda: "(3 receive processes)" in node.log())
        pushes = [subprocess.Popen([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "+sd",
                                    "127.0.0.1", str(node.port), str(folder)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for folder in folders]
        for push in pushes:
            _out, err = push.communicate(timeout=120)
            assert push.returncode == 0, err

        def settled():  # type: ignore[no-untyped-def]
            rows = table_rows(database_url, Series)
            return len(rows) == 3 and all(r.state in ("routed", "skipped") for r in rows) and rows
        rows = {r.series_uid: r for r in wait_for(settled, timeout=90)}
        spool = node.data_dir / "spool"
        for series_uid, series_files in study.items():
            assert rows[series_uid].instance_count == len(series_files) == 12
            assert len(list((spool / rows[series_uid].study_uid / series_uid).glob("*.dcm"))) == 12
        assert not list((spool / ".incoming").iterdir())

        def released():  # type: ignore[no-untyped-def]
            done = [a for a in table_rows(database_url, Association) if a.state == "released"]
            return len(done) == 4 and done
        assocs = wait_for(released, timeout=60)
        assert sorted(a.instances_received for a in assocs) == [9, 9, 9, 9]
        jobs = table_rows(database_url, Job)
        assert len(jobs) == 1 and jobs[0].state == "queued"

        # Counters from every receive process are summed by the parent's endpoint.
        samples = scrape(metrics_port)
        assert samples[("spine_node_instances_received_total", ())] == 36
        assert samples[("spine_node_received_bytes_total", ())] == sum(r.bytes_received for r in rows.values())
        assert samples[("spine_node_associations_total", (("outcome", "accepted"),))] == 4
        completed = sum(v for (name, _labels), v in samples.items() if name == "spine_node_series_completed_total")
        completions = [e for e in table_rows(database_url, AuditEvent) if e.kind == "series.complete"]
        assert completed == len(completions) == 3, [(e.at, e.series_uid) for e in completions]
        assert samples[("spine_node_jobs", (("state", "queued"),))] == 1
        assert samples[("spine_node_series", (("state", "routed"),))] == 1
        assert samples[("spine_node_series", (("state", "skipped"),))] == 2
    # Stopping serve stops its receive processes: nothing listens on the port any more.
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", node.port)) != 0


def receive_children(parent_pid: int) -> set[int]:
    """Pids of the receive processes of a serve (its spawned children, not the resource tracker)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent_pid and b"spawn_main" in cmdline:
            children.add(int(stat.parent.name))
    return children


def test_a_killed_receive_process_is_replaced(tmp_path):
    import signal

    study = write_study(tmp_path / "in", seed="replaced", series=1, per_series=5)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with NodeProcess(tmp_path / "node", url, args=("--processes", "2")) as node:
        assert node.proc is not None
        wait_for(lambda: "(2 receive processes)" in node.log())  # start-up is over
        first = wait_for(lambda: len(receive_children(node.proc.pid)) == 2 and receive_children(node.proc.pid))
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        try:
            second = wait_for(lambda: (kids := receive_children(node.proc.pid)) and len(kids) == 2
                              and victim not in kids and kids, timeout=60)
        except AssertionError:
            raise AssertionError(f"no replacement for {victim}: {receive_children(node.proc.pid)}\n"
                                 f"{node.log()[-3000:]}") from None
        assert len(second & first) == 1
        push = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "+sd",
                               "127.0.0.1", str(node.port), str(tmp_path / "in")],
                              capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        (series_uid, files), = study.items()
        rows = wait_for(lambda: [r for r in table_rows(url, Series) if r.instance_count == len(files)], timeout=30)
        assert rows[0].series_uid == series_uid
        assert "restarting" in node.log()
    assert not receive_children(node.proc.pid)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _exited(node: NodeProcess, timeout: float) -> int | None:
    assert node.proc is not None
    try:
        return node.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_serve_stops_on_sigterm_after_a_receive_process_was_replaced(tmp_path):
    """A child killed with SIGKILL used to leave the parent hanging in its stop for ever."""
    import signal

    url = f"sqlite:///{tmp_path / 'node.db'}"
    node = NodeProcess(tmp_path / "node", url, args=("--processes", "4")).start()
    try:
        assert node.proc is not None
        wait_for(lambda: "(4 receive processes)" in node.log(), timeout=90)
        first = wait_for(lambda: len(kids := receive_children(node.proc.pid)) == 4 and kids, timeout=60)
        os.kill(min(first), signal.SIGKILL)
        wait_for(lambda: len(kids := receive_children(node.proc.pid)) == 4 and min(first) not in kids,
                 timeout=60)
        everything = descendants(node.proc.pid)
        node.proc.send_signal(signal.SIGTERM)
        code = _exited(node, timeout=30)
        assert code is not None, f"serve still running 30 s after SIGTERM:\n{node.log()[-3000:]}"
        assert code == 0, node.log()[-3000:]
        _all_gone(everything)
        assert not _listening(node.port)
    finally:
        node.stop()


def _all_gone(pids: set[int], timeout: float = 5) -> None:
    """Every one of ``pids`` exits within ``timeout`` (helpers such as multiprocessing's
    resource tracker leave once the last holder of their pipe is gone)."""
    try:
        wait_for(lambda: not [pid for pid in pids if _alive(pid)], timeout=timeout)
    except AssertionError:
        raise AssertionError(f"still running: {[_describe(pid) for pid in pids if _alive(pid)]}") from None


def _describe(pid: int) -> str:
    try:
        return f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ').decode()[:200]}"
    except OSError:
        return f"{pid}: gone"


def test_sigkill_of_serve_takes_its_receivers_and_worker_along(tmp_path):
    import signal

    url = f"sqlite:///{tmp_path / 'node.db'}"
    node = NodeProcess(tmp_path / "node", url, env={"SPINE_NODE_WORKER__EMBEDDED": "true"},
                       args=("--processes", "2"))
    node.start()
    everything: set[int] = set()
    try:
        assert node.proc is not None
        # Two receivers and the embedded worker (plus helpers such as multiprocessing's).
        wait_for(lambda: len(receive_children(node.proc.pid)) == 2 and "worker: queues" in node.log(),
                 timeout=90)
        everything = descendants(node.proc.pid)
        assert len(everything) >= 3
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=10)
        try:
            _all_gone(everything, timeout=10)
        except AssertionError as exc:  # the children's own log lines say where they hung
            raise AssertionError(f"{exc}\n{node.log()[-4000:]}") from None
        assert not _listening(node.port)
    finally:
        for pid in everything:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        node.stop()


def test_ctrl_c_stops_an_idle_node_and_all_it_started(tmp_path):
    import signal

    url = f"sqlite:///{tmp_path / 'node.db'}"
    node = NodeProcess(tmp_path / "node", url, env={"SPINE_NODE_WORKER__EMBEDDED": "true"})
    node.start()
    try:
        assert node.proc is not None
        wait_for(lambda: "worker: queues" in node.log(), timeout=90)
        everything = descendants(node.proc.pid)
        os.killpg(node.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = _exited(node, timeout=20)
        assert code == 0, node.log()[-3000:]
        _all_gone(everything)
        assert not _listening(node.port)
    finally:
        node.stop()
