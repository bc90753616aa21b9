"""Faults: a full disk, retention, and a database that is missing or goes away.

The disk tests mount a small tmpfs for the spool (needs root; skipped with the reason
otherwise), so "full" is a real full volume, not a simulated one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, update

from spine_node.node.audit import AuditEvent, Job, Series
from spine_node.node.uids import derive_uid
from tests.dicom_factory import write_study
from tests.nodeproc import REPO, NodeProcess, table_rows, wait_for
from tests.peers import dcmtk, free_port, postgres_database, postgres_url
from tests.scu import association, echo_ok, store

MiB = 1 << 20
# storescu as a modality sending folders to the node's AE title.
PUSH = ("-aet", "MODALITY", "-aec", "SPINE_NODE", "+sd")


@pytest.fixture()
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for a real full disk needs root")
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def _fill(volume: Path, leave_free: int) -> Path:
    """Write a filler file so that about ``leave_free`` bytes stay free."""
    filler = volume / "filler.bin"
    free = os.statvfs(volume).f_bavail * os.statvfs(volume).f_frsize
    with filler.open("ab") as out:
        remaining = free - leave_free
        while remaining > 0:
            chunk = min(remaining, MiB)
            out.write(b"\0" * chunk)
            remaining -= chunk
    return filler


def _instance_files(tmp_path: Path, seed: str, count: int = 4) -> dict[str, list[Path]]:
    return write_study(tmp_path / seed, seed=seed, series=2, per_series=count // 2)


def _node(tmp_path: Path, volume: Path, **env: str) -> NodeProcess:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    return NodeProcess(tmp_path / "node", url, env={
        "SPINE_NODE_STORAGE__SPOOL_DIR": str(volume / "spool"), **env})


def test_disk_below_floor_answers_out_of_resources_then_resumes(tmp_path: Path, small_volume: Path) -> None:
    files = [p for paths in _instance_files(tmp_path, "floor").values() for p in paths]
    with _node(tmp_path, small_volume, SPINE_NODE_STORAGE__MIN_FREE_MB="4") as node:
        with association(node.port) as assoc:
            assert store(assoc, files[0]) == 0
            filler = _fill(small_volume, 3 * MiB)
            time.sleep(0.3)  # past the guard's last look at the volume (every 0.25 s)
            assert store(assoc, files[1]) == 0xA700
            assert store(assoc, files[1]) == 0xA700
            filler.unlink()
            assert store(assoc, files[1]) == 0
            assert store(assoc, files[2]) == 0
        spool = small_volume / "spool"
        stored = {p.name for p in spool.rglob("*.dcm")}
        assert stored == {f"{dcmread(f).SOPInstanceUID}.dcm" for f in files[:3]}
        assert not any((spool / ".incoming").iterdir())
        # Audit rows are written behind receive: wait for them.
        refused = wait_for(lambda: len(r := [e for e in table_rows(node.database_url, AuditEvent)
                                             if e.kind == "instance.refused"]) >= 2 and r)
        assert len(refused) == 2 and all(e.details["status"] == "0xA700" for e in refused)


def test_disk_actually_full_mid_write_is_a_status_not_a_crash(tmp_path: Path, small_volume: Path) -> None:
    """No floor: the volume fills up while the data set is being written."""
    files = [p for paths in _instance_files(tmp_path, "enospc").values() for p in paths]
    with _node(tmp_path, small_volume, SPINE_NODE_STORAGE__MIN_FREE_MB="0") as node:
        with association(node.port) as assoc:
            assert store(assoc, files[0]) == 0
            filler = _fill(small_volume, 8 * 1024)
            status = store(assoc, files[1])
            assert status == 0xA700, hex(status)
            assert assoc.is_established
        assert echo_ok(node.port)
        filler.unlink()
        spool = small_volume / "spool"
        wait_for(lambda: not any((spool / ".incoming").iterdir()), timeout=30)
        with association(node.port) as assoc:
            assert store(assoc, files[1]) == 0
            assert store(assoc, files[2]) == 0
        assert len(list(spool.rglob("*.dcm"))) == 3
        assert node.proc is not None and node.proc.poll() is None


def _wait_states(url: str, expected: dict[str, str], timeout: float = 60) -> dict[str, Series]:
    def done():  # type: ignore[no-untyped-def]
        rows = {r.series_uid: r for r in table_rows(url, Series)}
        return all(uid in rows and rows[uid].state == state for uid, state in expected.items()) and rows
    return wait_for(done, timeout=timeout)


def test_emergency_cleaning_deletes_oldest_finished_series_only(tmp_path: Path, small_volume: Path) -> None:
    study = _instance_files(tmp_path, "retention", count=8)
    spine, chest = list(study)
    with _node(tmp_path, small_volume, SPINE_NODE_STORAGE__MIN_FREE_MB="2",
               SPINE_NODE_STORAGE__EMERGENCY_FREE_MB="8") as node:
        push = subprocess.run([dcmtk("storescu"), *PUSH, "127.0.0.1", str(node.port),
                               str(tmp_path / "retention")], capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        _wait_states(node.database_url, {spine: "routed", chest: "skipped"})
        spool = small_volume / "spool"
        study_uid = dcmread(study[spine][0]).StudyInstanceUID
        _fill(small_volume, 6 * MiB)
        # The skipped series goes; the routed one stays while its job is queued.
        wait_for(lambda: not (spool / study_uid / chest).exists(), timeout=30)
        time.sleep(1.5)
        assert (spool / study_uid / spine).is_dir()
        engine = create_engine(node.database_url)
        with engine.begin() as conn:  # the worker finished the job
            conn.execute(update(Job).where(Job.series_uid == spine).values(state="succeeded"))
        engine.dispose()
        wait_for(lambda: not (spool / study_uid).exists(), timeout=30)
        purged = [e for e in table_rows(node.database_url, AuditEvent) if e.kind == "series.purged"]
        assert [e.series_uid for e in purged] == [chest, spine]
        assert all("below 8 MiB free" in e.message and e.details["instances"] == 4 for e in purged)
        assert {r.series_uid for r in table_rows(node.database_url, Series)} == set()
        assert [j.state for j in table_rows(node.database_url, Job)] == ["succeeded"]
        # Still above the receive floor: the study can be sent again, and counts start afresh.
        again = subprocess.run([dcmtk("storescu"), *PUSH, "127.0.0.1", str(node.port),
                                str(tmp_path / "retention")], capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        rows = _wait_states(node.database_url, {spine: "routed"})
        assert rows[spine].instance_count == 4


def test_age_retention_deletes_old_series(tmp_path: Path) -> None:
    study = _instance_files(tmp_path, "aged", count=4)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    # 0.00003 days is about 2.6 seconds.
    env = {"SPINE_NODE_STORAGE__RETENTION_DAYS": "0.00003"}
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        push = subprocess.run([dcmtk("storescu"), *PUSH, "127.0.0.1", str(node.port),
                               str(tmp_path / "aged")], capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        chest = list(study)[1]
        wait_for(lambda: [e for e in table_rows(url, AuditEvent) if e.kind == "series.purged"
                          and e.series_uid == chest], timeout=60)
        purged = [e for e in table_rows(url, AuditEvent) if e.kind == "series.purged"]
        assert [e.series_uid for e in purged] == [chest]  # the spine series has a queued job
        assert "older than 3e-05 days" in purged[0].message
        assert not (node.data_dir / "spool" / purged[0].study_uid / chest).exists()


# -- the database -------------------------------------------------------------------------

def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spine_node.node.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_database_unreachable_at_start_exits_2_without_the_password(tmp_path: Path) -> None:
    closed = free_port()
    url = f"postgresql+psycopg2://spine:S3cretPassw0rd@127.0.0.1:{closed}/spine"
    node = NodeProcess(tmp_path / "node", url)
    for command in (("serve",), ("status",), ("series", "list"), ("audit", "tail"), ("db", "upgrade")):
        done = _cli(node.env, *command)
        output = done.stdout + done.stderr
        assert done.returncode == 2, (command, output)
        assert "cannot" in output and "database" in output and "127.0.0.1" in output, output
        assert "S3cretPassw0rd" not in output and "Traceback" not in output, output
        assert "spine:***@" in output.replace("\n", ""), output


def test_database_outage_during_run_loses_no_instance(tmp_path: Path) -> None:
    """PostgreSQL refuses connections for a while; receive goes on and counts catch up."""
    from spine_node.node.db_migrate import upgrade

    sqlalchemy = pytest.importorskip("sqlalchemy")
    study = _instance_files(tmp_path, "outage", count=8)
    with postgres_database() as url:
        upgrade(url)
        name = url.rsplit("/", 1)[1]
        admin = sqlalchemy.create_engine(postgres_url(), isolation_level="AUTOCOMMIT")

        def connections(allowed: bool) -> None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
                if not allowed:
                    conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                         f"WHERE datname = '{name}'")
        try:
            with NodeProcess(tmp_path / "node", url) as node:
                assert echo_ok(node.port)
                connections(False)
                try:
                    push = subprocess.run([dcmtk("storescu"), *PUSH, "127.0.0.1",
                                           str(node.port), str(tmp_path / "outage")],
                                          capture_output=True, text=True, timeout=120)
                    assert push.returncode == 0, push.stderr
                    assert echo_ok(node.port)
                    time.sleep(2)  # several flush attempts fail meanwhile
                    spool = node.data_dir / "spool"
                    assert len(list(spool.rglob("*.dcm"))) == 8
                finally:
                    connections(True)
                rows = _wait_states(url, {uid: state for uid, state in zip(study, ("routed", "skipped"), strict=True)})
                assert [rows[uid].instance_count for uid in study] == [4, 4]
                # The associations of the outage are audited once the database is back.
                from spine_node.node.audit import Association

                assocs = wait_for(lambda: [a for a in table_rows(url, Association)
                                           if a.state == "released" and a.instances_received == 8])
                assert len(assocs) == 1
                assert "cannot write series counts" in node.log()
                # Said by the tracker's own flush thread, asynchronously: give it a moment.
                wait_for(lambda: "database reachable again" in node.log(), timeout=30)
        finally:
            admin.dispose()



def test_sqlite_locked_for_a_while_loses_no_instance(tmp_path: Path) -> None:
    """Another process holds the SQLite write lock for seconds while a study arrives."""
    import sqlite3

    study = _instance_files(tmp_path, "locked", count=8)
    db_path = tmp_path / "node.db"
    with NodeProcess(tmp_path / "node", f"sqlite:///{db_path}") as node:
        assert echo_ok(node.port)
        lock = sqlite3.connect(db_path, timeout=5, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            push = subprocess.Popen([dcmtk("storescu"), *PUSH, "127.0.0.1", str(node.port),
                                     str(tmp_path / "locked")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            time.sleep(5)
        finally:
            lock.execute("COMMIT")
            lock.close()
        _out, err = push.communicate(timeout=120)
        assert push.returncode == 0, err
        rows = _wait_states(node.database_url, dict(zip(study, ("routed", "skipped"), strict=True)))
        assert [rows[uid].instance_count for uid in study] == [4, 4]
        assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 8


def test_complete_files_left_in_incoming_by_a_power_cut_are_placed_at_start(tmp_path: Path) -> None:
    """An answered instance is synced under its temporary name before it is linked into the
    spool; if a power cut kept the first and lost the link, the next start places it.
    Partial, empty or broken leftovers are deleted."""
    study = write_study(tmp_path / "in", seed="salvage", series=1, per_series=3)
    (series_uid, files), = study.items()
    incoming = tmp_path / "node" / "spool" / ".incoming"
    incoming.mkdir(parents=True)
    whole = files[0].read_bytes()
    (incoming / "answered.dcm").write_bytes(whole)
    (incoming / "cut.dcm").write_bytes(files[1].read_bytes()[:-1000])  # a transfer cut short
    (incoming / "spare.dcm").write_bytes(b"")  # a file made ahead for a next C-STORE
    (incoming / "not-dicom.dcm").write_bytes(b"\0" * 200)
    sop = dcmread(files[0]).SOPInstanceUID
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with NodeProcess(tmp_path / "node", url) as node:
        assert not any(incoming.iterdir())
        placed = list((node.data_dir / "spool").rglob(f"{sop}.dcm"))
        assert len(placed) == 1 and placed[0].read_bytes() == whole
        assert placed[0].parent.name == series_uid
        # Counted in the database like a received instance, then completed and routed.
        rows = wait_for(lambda: [r for r in table_rows(url, Series)
                                 if r.series_uid == series_uid and r.state in ("routed", "skipped")])
        assert rows[0].instance_count == 1
        assert "placed 1 complete instance" in node.log()


def test_a_restarted_node_counts_quiet_periods_from_its_restart(tmp_path: Path) -> None:
    """``serve`` was killed mid-association: the instances it had are in the spool with
    old timestamps, and the peer re-sends the whole series after the restart. The part
    must not complete by those old timestamps (it would be routed and reported)."""
    study = write_study(tmp_path / "in", seed="restart", series=1, per_series=3)
    (series_uid, files), = study.items()
    first = dcmread(files[0])
    hour_ago = time.time() - 3600
    for path in files[:2]:  # 2 of 3 arrived before the node died
        ds = dcmread(path, stop_before_pixels=True)
        target = tmp_path / "node" / "spool" / first.StudyInstanceUID / series_uid / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        os.utime(target, (hour_ago, hour_ago))
    url = f"sqlite:///{tmp_path / 'node.db'}"
    started = datetime.now(UTC).replace(tzinfo=None)
    env = {"SPINE_NODE_ASSEMBLY__QUIET_PERIOD_S": "30", "SPINE_NODE_ASSEMBLY__STUDY_QUIET_PERIOD_S": "30"}
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        # Start recovered the series from the spool before it listened.
        (row,) = [r for r in table_rows(url, Series) if r.series_uid == series_uid]
        assert row.state == "receiving" and row.instance_count == 2
        assert row.last_received_at >= started, (row.last_received_at, started)
        assert "quiet period counts from now" in node.log()


def test_worker_started_while_the_database_is_down_waits_for_it(tmp_path: Path) -> None:
    """``spine-node worker`` before its database: one line saying it waits (no traceback),
    then it starts by itself once PostgreSQL lets it in."""
    import json
    import signal

    from spine_node.node.db_migrate import upgrade

    with postgres_database() as url:
        upgrade(url)
        name = url.rsplit("/", 1)[1]
        admin = create_engine(postgres_url(), isolation_level="AUTOCOMMIT")

        def connections(allowed: bool) -> None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
                if not allowed:
                    conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                         f"WHERE datname = '{name}'")

        log_path = tmp_path / "worker.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
               "SPINE_NODE_DATABASE_URL": url, "SPINE_NODE_STORAGE__DATA_DIR": str(tmp_path / "data"),
               "SPINE_NODE_WORKER__PIPELINE_MODULES": json.dumps([])}
        connections(False)
        try:
            with log_path.open("wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "spine_node.node.cli", "worker", "--queues", "cpu"],
                                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            try:
                wait_for(lambda: "not reachable" in log_path.read_text() or proc.poll() is not None, timeout=60)
                assert proc.poll() is None, log_path.read_text()[-3000:]
                connections(True)
                wait_for(lambda: "reachable after" in log_path.read_text() or proc.poll() is not None, timeout=60)
                wait_for(lambda: " ready." in log_path.read_text() or proc.poll() is not None, timeout=60)
                assert proc.poll() is None, log_path.read_text()[-3000:]
                text = log_path.read_text()
                assert "Traceback" not in text
                waiting = [line for line in text.splitlines() if "not reachable" in line]
                assert len(waiting) == 1 and "password" not in waiting[0].lower(), waiting
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        finally:
            connections(True)
            admin.dispose()


def test_frozen_database_never_holds_up_echo_or_store(tmp_path: Path) -> None:
    """PostgreSQL stops answering (as after SIGSTOP: connections accepted, no replies).
    C-ECHO and C-STORE go on being answered; once it answers again, every instance is
    counted and every association has its audit row."""
    from sqlalchemy.engine import make_url

    from spine_node.node.audit import Association
    from spine_node.node.db_migrate import upgrade
    from tests.freezable import FreezableRelay

    study = _instance_files(tmp_path, "frozen", count=8)
    with postgres_database() as url:
        upgrade(url)
        real = make_url(url)
        relay = FreezableRelay(real.host or "127.0.0.1", real.port or 5432)
        relayed = real.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
        try:
            with NodeProcess(tmp_path / "node", relayed) as node:
                assert echo_ok(node.port)
                relay.freeze()
                try:
                    timeouts = ["-to", "10", "-ta", "10", "-td", "10", "-aec", "SPINE_NODE"]
                    echo = subprocess.run([dcmtk("echoscu"), *timeouts, "-aet", "MODALITY", "127.0.0.1",
                                           str(node.port)], capture_output=True, text=True, timeout=60)
                    assert echo.returncode == 0, echo.stderr
                    push = subprocess.run([dcmtk("storescu"), *timeouts, "-aet", "MODALITY", "+sd", "127.0.0.1",
                                           str(node.port), str(tmp_path / "frozen")],
                                          capture_output=True, text=True, timeout=60)
                    assert push.returncode == 0, push.stderr
                    assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 8
                finally:
                    relay.thaw()
                rows = _wait_states(url, dict(zip(study, ("routed", "skipped"), strict=True)))
                assert [rows[uid].instance_count for uid in study] == [4, 4]
                # Three associations (the first C-ECHO, the frozen C-ECHO, the store), all audited.
                released = wait_for(lambda: len(r := [a for a in table_rows(url, Association)
                                                      if a.state == "released"]) >= 3 and r)
                assert sorted(a.instances_received for a in released) == [0, 0, 8]
        finally:
            relay.close()


def _big_instances(folder: Path, seed: str, count: int, side: int = 1024) -> list[Path]:
    """``count`` CT instances of ``side`` x ``side`` 16-bit pixels (2 MiB at 1024)."""
    from tests.dicom_factory import real_ct

    folder.mkdir(parents=True, exist_ok=True)
    study, series = derive_uid("big", seed), derive_uid("big", seed, "series")
    paths = []
    for index in range(count):
        ds = real_ct()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = derive_uid(series, str(index))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.Rows = ds.Columns = side
        ds.PixelData = bytes(2 * side * side)
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class _LowestFree:
    """Samples a volume's free space while a flood runs; keeps the lowest seen."""

    def __init__(self, volume: Path) -> None:
        import shutil
        import threading

        self.volume = volume
        self.lowest = shutil.disk_usage(volume).free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import shutil

        while not self._stop.is_set():
            self.lowest = min(self.lowest, shutil.disk_usage(self.volume).free)
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.lowest


@pytest.mark.parametrize("associations", [1, 8])
def test_floor_holds_under_a_full_speed_flood(tmp_path: Path, small_volume: Path, associations: int) -> None:
    """40 MiB sent as fast as storescu can at a 24 MiB volume with an 8 MiB floor: free space
    never goes below the floor (by more than one network read), and what was answered
    success is in the spool."""
    floor = 8 * MiB
    files = _big_instances(tmp_path / "big", f"flood{associations}", 20)
    folders = []
    for part in range(associations):
        folder = tmp_path / f"part{part}"
        folder.mkdir()
        for path in files[part::associations]:
            os.link(path, folder / path.name)
        folders.append(folder)
    with _node(tmp_path, small_volume, SPINE_NODE_STORAGE__MIN_FREE_MB=str(floor // MiB)) as node:
        watch = _LowestFree(small_volume)
        pushes = [subprocess.Popen([dcmtk("storescu"), *PUSH, "127.0.0.1", str(node.port), str(folder)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                  for folder in folders]
        for push in pushes:
            push.communicate(timeout=120)
        lowest = watch.stop()
        import shutil

        free = shutil.disk_usage(small_volume).free
        stored = list((small_volume / "spool").rglob("*.dcm"))
        assert 0 < len(stored) < len(files)  # the floor was reached
        assert free >= floor, (free, floor)
        assert lowest >= floor - MiB, (lowest, floor)
        wait_for(lambda: not any((small_volume / "spool" / ".incoming").iterdir()), timeout=30)


def test_a_frozen_database_fails_a_new_connection_in_bounded_time(tmp_path: Path) -> None:
    """A new connection to a PostgreSQL that accepts TCP and never answers raises after the
    connect timeout instead of holding its caller for ever."""
    import threading

    from sqlalchemy.engine import make_url

    from spine_node.node.audit import CONNECT_TIMEOUT_S, Database
    from tests.freezable import FreezableRelay

    with postgres_database() as url:
        real = make_url(url)
        relay = FreezableRelay(real.host or "127.0.0.1", real.port or 5432)
        db = Database(real.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False))
        outcome: list[BaseException | bool] = []
        try:
            relay.freeze()

            def call() -> None:
                try:
                    outcome.append(db.is_current())
                except Exception as exc:  # noqa: BLE001 - what the test looks at
                    outcome.append(exc)

            threading.Thread(target=call, daemon=True).start()
            wait_for(lambda: outcome, timeout=CONNECT_TIMEOUT_S + 20)
            assert isinstance(outcome[0], Exception) and "timeout" in str(outcome[0]).lower(), outcome
        finally:
            relay.close()
            db.dispose()
