"""Eight associations pushing eight different studies at once: nothing lost, nothing mixed."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread

from spine_node.node.audit import Association, Series
from tests.dicom_factory import dataset_bytes, write_study
from tests.nodeproc import NodeProcess, table_rows, wait_for
from tests.peers import dcmtk
from tests.scu import association, store

PEERS = 8
SERIES = 2
PER_SERIES = 5


def _studies(tmp_path: Path) -> list[dict[str, list[Path]]]:
    return [write_study(tmp_path / f"study{i}", seed=f"concurrent-{i}", series=SERIES, per_series=PER_SERIES)
            for i in range(PEERS)]


def _push_pynetdicom(port: int, studies: list[dict[str, list[Path]]]) -> list[list[int]]:
    statuses: list[list[int]] = [[] for _ in studies]
    errors: list[BaseException] = []
    start = threading.Barrier(len(studies))

    def peer(index: int) -> None:
        try:
            files = [p for paths in studies[index].values() for p in paths]
            # All eight associate at once. (Waiting for the others after associating let
            # an early association idle past the peers' 30 s network timeout when the
            # machine was loaded, and the peer then dropped it.)
            start.wait(timeout=60)
            with association(port, calling=f"PEER{index}") as assoc:
                for path in files:
                    statuses[index].append(store(assoc, path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(len(studies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return statuses


def _push_storescu(port: int, tmp_path: Path, count: int) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", f"PEER{i}", "-aec", "SPINE_NODE", "+sd", "127.0.0.1",
                               str(port),
                               str(tmp_path / f"study{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(count)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _check(node: NodeProcess, studies: list[dict[str, list[Path]]]) -> None:
    spool = node.data_dir / "spool"
    expected = 0
    for study in studies:
        for series_uid, files in study.items():
            for original in files:
                ds = dcmread(original, stop_before_pixels=True)
                stored = spool / ds.StudyInstanceUID / series_uid / f"{ds.SOPInstanceUID}.dcm"
                assert stored.is_file(), stored
                assert dataset_bytes(stored) == dataset_bytes(original)
                expected += 1
    assert len(list(spool.rglob("*.dcm"))) == expected == PEERS * SERIES * PER_SERIES

    def all_counted():  # type: ignore[no-untyped-def]
        rows = table_rows(node.database_url, Series)
        return len(rows) == PEERS * SERIES and all(r.state in ("routed", "skipped") for r in rows) and rows
    rows = {r.series_uid: r for r in wait_for(all_counted, timeout=120)}
    for study in studies:
        for series_uid, files in study.items():
            row = rows[series_uid]
            assert row.instance_count == PER_SERIES
            assert row.study_uid == dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
            assert row.bytes_received == sum(
                (spool / row.study_uid / series_uid).joinpath(p.name).stat().st_size
                for p in (spool / row.study_uid / series_uid).iterdir())

    def released():  # type: ignore[no-untyped-def]
        assocs = [a for a in table_rows(node.database_url, Association) if a.calling_ae_title.startswith("PEER")]
        return len(assocs) == PEERS and all(a.state == "released" for a in assocs) and assocs
    assocs = wait_for(released, timeout=60)
    assert sorted(a.instances_received for a in assocs) == [SERIES * PER_SERIES] * PEERS
    assert all(a.instances_failed == 0 for a in assocs)


def test_eight_pynetdicom_peers_at_once(tmp_path: Path, database_url: str) -> None:
    studies = _studies(tmp_path)
    with NodeProcess(tmp_path / "node", database_url) as node:
        statuses = _push_pynetdicom(node.port, studies)
        assert statuses == [[0] * SERIES * PER_SERIES] * PEERS
        _check(node, studies)


@pytest.mark.parametrize("peers", [PEERS])
def test_eight_storescu_processes_at_once(tmp_path: Path, peers: int) -> None:
    studies = _studies(tmp_path)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with NodeProcess(tmp_path / "node", url) as node:
        results = _push_storescu(node.port, tmp_path, peers)
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
        _check(node, studies)


def test_same_study_from_four_peers_at_once_is_counted_once(tmp_path: Path) -> None:
    """Re-sends racing each other replace the instance; the series count stays exact."""
    study = write_study(tmp_path / "study0", seed="same-study", series=SERIES, per_series=PER_SERIES)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with NodeProcess(tmp_path / "node", url) as node:
        statuses = _push_pynetdicom(node.port, [study] * 4)
        assert statuses == [[0] * SERIES * PER_SERIES] * 4

        def counted():  # type: ignore[no-untyped-def]
            rows = table_rows(url, Series)
            return len(rows) == SERIES and all(r.state in ("routed", "skipped") for r in rows) and rows
        assert [r.instance_count for r in wait_for(counted, timeout=120)] == [PER_SERIES] * SERIES
        assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == SERIES * PER_SERIES
