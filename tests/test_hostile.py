"""Hostile input against a live ``spine-node serve``: bad data sets, bad UIDs, bad peers.

Every corpus item is built here from a real CT slice and sent by a real peer (pynetdicom
streaming the file bytes as they are, DCMTK storescu, or a raw socket speaking the
upper layer protocol by hand). For each: the right DICOM status or a stored instance,
the node still answers C-ECHO, nothing lands outside the spool, and the good instances
sent around the bad one in the same association are all there.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom.dsutils import encode
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from spine_node.node.audit import AuditEvent, Series
from spine_node.node.receive import TRANSFER_SYNTAXES
from spine_node.node.uids import derive_uid, is_valid_uid
from tests.dicom_factory import dataset_bytes, real_ct
from tests.nodeproc import NodeProcess, wait_for
from tests.peers import dcmtk
from tests.scu import (
    CT_IMAGE_STORAGE,
    LITTLE_ENDIAN,
    association,
    echo_ok,
    pdata_pdu,
    raw_associate,
    raw_store,
    release,
    store,
    store_command,
    write_with_meta,
)

JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"
TOKEN = f"pwned-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("hostile")
    url = f"sqlite:///{root / 'node' / 'node.db'}"
    with NodeProcess(root / "node", url) as proc:
        yield proc
    assert proc.proc is not None


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(autouse=True)
def _node_survives(node: NodeProcess) -> Iterator[None]:
    yield
    assert node.proc is not None and node.proc.poll() is None, f"serve died:\n{node.log()[-3000:]}"
    assert echo_ok(node.port), "C-ECHO fails after the hostile input"
    _assert_spool_clean(node)


def _assert_spool_clean(node: NodeProcess) -> None:
    """Every spool file is <uid>/<uid>/<uid>.dcm; nothing carries the escape token anywhere."""
    spool = node.data_dir / "spool"
    for path in spool.rglob("*"):
        rel = path.relative_to(spool)
        assert TOKEN not in str(path)
        if path.is_file() and rel.parts[0] not in (".incoming", ".trash"):
            study, series, name = rel.parts
            assert is_valid_uid(study) and is_valid_uid(series) and name.endswith(".dcm")
            assert is_valid_uid(name[:-4])
    # The whole temporary tree of this test session, and its parent, hold no escaped file.
    base = node.data_dir.parents[1]
    for top in (base, base.parent, Path("/tmp")):
        found = subprocess.run(["find", str(top), "-maxdepth", "6", "-name", f"*{TOKEN}*"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
        assert not found, f"file outside the spool: {found}"


def _incoming_empty(node: NodeProcess) -> bool:
    return not any((node.data_dir / "spool" / ".incoming").iterdir())


# -- building the corpus ------------------------------------------------------------------

def _instance(study: str, index: int, series: str | None = None) -> Dataset:
    ds = real_ct()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or derive_uid(study, "series")
    ds.SOPInstanceUID = derive_uid(study, "instance", str(index))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.BodyPartExamined = "CSPINE"
    ds.InstanceNumber = index + 1
    return ds


def _write(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    dcmwrite(path, ds, enforce_file_format=UID(syntax).is_little_endian, little_endian=UID(syntax).is_little_endian,
             implicit_vr=UID(syntax).is_implicit_VR, force_encoding=not UID(syntax).is_little_endian)
    return path


def _encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set alone, as it goes on the wire."""
    data = encode(ds, UID(syntax).is_implicit_VR, UID(syntax).is_little_endian)
    assert data is not None
    return data


def _splice(path: Path, dataset: bytes) -> Path:
    """Replace the data set of a file, keeping its preamble and meta."""
    raw = path.read_bytes()
    head = len(raw) - len(dataset_bytes(path))
    path.write_bytes(raw[:head] + dataset)
    return path


def _stored(node: NodeProcess, ds: Dataset) -> Path:
    return node.data_dir / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _series_rows(node: NodeProcess) -> dict[str, Series]:
    engine = create_engine(node.database_url)
    try:
        with Session(engine) as session:
            return {row.series_uid: row for row in session.scalars(select(Series))}
    finally:
        engine.dispose()


def _events(node: NodeProcess, kind: str) -> list[AuditEvent]:
    engine = create_engine(node.database_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind)))
    finally:
        engine.dispose()


def _sandwich(node: NodeProcess, work: Path, bad: Callable[[str], Path | Dataset],
              contexts: tuple = ((CT_IMAGE_STORAGE, LITTLE_ENDIAN),)) -> tuple[int, list[Dataset]]:
    """Send good, bad, good in one association; return the bad status and the goods."""
    study = derive_uid("hostile", work.name)
    goods = [_instance(study, 0), _instance(study, 1)]
    with association(node.port, contexts) as assoc:
        assert store(assoc, _write(goods[0], work / "good0.dcm")) == 0
        status = store(assoc, bad(study))
        assert assoc.is_established, "the node dropped the association over one bad instance"
        assert store(assoc, _write(goods[1], work / "good1.dcm")) == 0
    for good in goods:
        stored = _stored(node, good)
        assert stored.is_file(), "a good instance of the same study was lost"
        assert dataset_bytes(stored) == dataset_bytes(work / f"good{goods.index(good)}.dcm")
    return status, goods


# -- data sets the node refuses with a status ---------------------------------------------

def test_truncated_in_pixel_data_is_refused(node: NodeProcess, work: Path) -> None:
    def bad(study: str) -> Path:
        path = _write(_instance(study, 7), work / "bad.dcm")
        path.write_bytes(path.read_bytes()[:-5000])
        return path
    status, _ = _sandwich(node, work, bad)
    assert status == 0xC210
    assert not (node.data_dir / "spool" / derive_uid("hostile", work.name) / "x").exists()
    refused = [e for e in _events(node, "instance.refused") if "remain" in e.message]
    assert refused and refused[-1].details["status"] == "0xC210"


def test_truncated_in_header_is_refused(node: NodeProcess, work: Path) -> None:
    def bad(study: str) -> Path:
        path = _write(_instance(study, 7), work / "bad.dcm")
        cut = len(path.read_bytes()) - len(dataset_bytes(path)) + 203
        path.write_bytes(path.read_bytes()[:cut])
        return path
    status, _ = _sandwich(node, work, bad)
    assert status == 0xC210


def test_file_meta_disagreeing_with_data_set_is_refused(node: NodeProcess, work: Path) -> None:
    """The meta names another SOP Instance UID: the request and the data set disagree."""
    def bad(study: str) -> Path:
        return write_with_meta(_instance(study, 7), work / "bad.dcm",
                               meta_sop_instance=_instance(study, 8).SOPInstanceUID)
    status, _ = _sandwich(node, work, bad)
    assert status == 0xC221


def test_meta_claims_explicit_vr_but_data_set_is_implicit(node: NodeProcess, work: Path) -> None:
    def bad(study: str) -> Path:
        ds = _instance(study, 7)
        path = _write(ds, work / "bad.dcm", ExplicitVRLittleEndian)
        return _splice(path, _encoded(ds, ImplicitVRLittleEndian))
    status, _ = _sandwich(node, work, bad)
    assert status == 0xC210


def test_two_gigabyte_element_length_is_refused(node: NodeProcess, work: Path) -> None:
    def bad(study: str) -> Path:
        ds = _instance(study, 7)
        ds.add_new(0x00090010, "LO", "HOSTILE")
        ds.add_new(0x00091001, "OB", b"\0" * 16)
        path = _write(ds, work / "bad.dcm")
        raw = path.read_bytes()
        element = b"\x09\x00\x01\x10OB\x00\x00" + struct.pack("<L", 16)
        assert raw.count(element) == 1
        path.write_bytes(raw.replace(element, element[:-4] + struct.pack("<L", 0x7FFFFFF0)))
        return path
    status, _ = _sandwich(node, work, bad)
    assert status == 0xC210


def test_sequences_nested_without_end_are_refused(node: NodeProcess, work: Path) -> None:
    """A nesting bomb: 2000 undefined-length sequences, never closed."""
    def bad(study: str) -> Path:
        ds = _instance(study, 7)
        path = _write(ds, work / "bad.dcm")
        bomb = (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff") * 2000
        data = dataset_bytes(path)
        return _splice(path, data[:8 + 26] + bomb)
    status, _ = _sandwich(node, work, bad)
    assert status in (0xC210, 0xC220)


def test_deflate_bomb_is_refused(node: NodeProcess, work: Path) -> None:
    """A deflated data set of a few hundred KiB that would inflate to 200 MiB of zeros."""
    def bad(study: str) -> Path:
        ds = _instance(study, 7)
        path = _write(ds, work / "bad.dcm", DeflatedExplicitVRLittleEndian)
        bomb_size = 200 << 20
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        parts = [deflater.compress(_encoded(ds) + b"\x09\x00\x02\x10OB\x00\x00" + struct.pack("<L", bomb_size))]
        zeros = bytes(1 << 20)
        parts += [deflater.compress(zeros) for _ in range(bomb_size >> 20)]
        parts.append(deflater.flush())
        return _splice(path, b"".join(parts))
    contexts = ((CT_IMAGE_STORAGE, LITTLE_ENDIAN), (CT_IMAGE_STORAGE, [DeflatedExplicitVRLittleEndian]))
    status, _ = _sandwich(node, work, bad, contexts)
    assert status == 0xC210
    assert (work / "bad.dcm").stat().st_size < 1 << 20


def test_missing_pixel_data_is_refused(node: NodeProcess, work: Path) -> None:
    def bad(study: str) -> Path:
        ds = _instance(study, 7)
        del ds.PixelData
        return _write(ds, work / "bad.dcm")
    status, _ = _sandwich(node, work, bad)
    assert status == 0xA900


@pytest.mark.parametrize("field, value", [
    ("StudyInstanceUID", f"../../../../../{TOKEN}"),
    ("StudyInstanceUID", f"/tmp/{TOKEN}"),
    ("SeriesInstanceUID", f"1.2/../../{TOKEN}"),
    ("SeriesInstanceUID", f"1.2\\..\\{TOKEN}"),
    ("StudyInstanceUID", "1.2.3\\4.5.6"),  # two values
    ("StudyInstanceUID", "1." + "1" * 70),  # too long
    ("SOPInstanceUID", ".."),
    ("SOPInstanceUID", f"../{TOKEN}"),
    ("StudyInstanceUID", ""),
])
def test_uid_that_is_not_a_uid_is_refused(node: NodeProcess, work: Path, field: str, value: str) -> None:
    def bad(study: str) -> Dataset:
        ds = _instance(study, 7)
        setattr(ds, field, value)
        if field == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
        return ds
    status, _ = _sandwich(node, work, bad)
    assert status == 0xC220


def test_smuggled_file_meta_elements_are_refused(node: NodeProcess, work: Path) -> None:
    """A data set that starts with group 0002 (meta) elements naming another syntax."""
    study = derive_uid("hostile", work.name)
    ds = _instance(study, 7)
    smuggled = Dataset()
    smuggled.TransferSyntaxUID = ImplicitVRLittleEndian
    data = _encoded(smuggled) + _encoded(ds)
    sock = raw_associate(node.port)
    try:
        assert raw_store(sock, CT_IMAGE_STORAGE, ds.SOPInstanceUID, data) == 0xC210
        good = _instance(study, 8)
        assert raw_store(sock, CT_IMAGE_STORAGE, good.SOPInstanceUID, _encoded(good), message_id=2) == 0
    finally:
        release(sock)
    assert not _stored(node, ds).exists() and _stored(node, good).is_file()


# -- contexts the node does not accept ----------------------------------------------------

@pytest.mark.parametrize("abstract, syntax", [
    ("1.2.826.0.1.3680043.9.7433.99.1", ExplicitVRLittleEndian),  # a private SOP class
    ("1.2.840.10008.5.1.4.1.2.1.1", ExplicitVRLittleEndian),  # a query model, not storage
    (CT_IMAGE_STORAGE, JPEG_XL_LOSSLESS),  # a codec the node has no decoder for
    (CT_IMAGE_STORAGE, ExplicitVRBigEndian),  # retired; SCUs convert to little endian
])
def test_context_the_node_does_not_accept_is_rejected(node: NodeProcess, work: Path,
                                                      abstract: str, syntax: str) -> None:
    study = derive_uid("hostile", work.name)
    ds = _instance(study, 7)
    ds.SOPClassUID = abstract
    ds.file_meta.MediaStorageSOPClassUID = abstract
    with association(node.port, ((abstract, [syntax]),)) as assoc:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [abstract]
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(ds)
        assert assoc.send_c_echo().Status == 0


def test_every_accepted_compressed_syntax_has_a_decoder() -> None:
    """The node only accepts encodings its pipelines can decode (declared dependencies)."""
    for syntax in map(UID, TRANSFER_SYNTAXES):
        if syntax.is_compressed:
            assert get_decoder(syntax).is_available, f"no decoder for accepted {syntax.name}"


def test_big_endian_file_is_converted_by_storescu_and_stored(node: NodeProcess, work: Path) -> None:
    ds = _instance(derive_uid("hostile", work.name), 7)
    path = _write(ds, work / "big.dcm", ExplicitVRBigEndian)
    push = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "127.0.0.1", str(node.port),
                           str(path)],
                          capture_output=True, text=True, timeout=60)
    assert push.returncode == 0, push.stderr
    stored = dcmread(_stored(node, ds))
    assert stored.file_meta.TransferSyntaxUID.is_little_endian
    assert stored.pixel_array.tobytes() == dcmread(path).pixel_array.astype(stored.pixel_array.dtype).tobytes()


def test_file_without_preamble_and_meta_is_sent_by_storescu_and_stored(node: NodeProcess, work: Path) -> None:
    ds = _instance(derive_uid("hostile", work.name), 7)
    path = work / "bare.dcm"
    path.write_bytes(_encoded(ds, ImplicitVRLittleEndian))
    push = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "127.0.0.1", str(node.port),
                           str(path)],
                          capture_output=True, text=True, timeout=60)
    assert push.returncode == 0, push.stderr
    assert dcmread(_stored(node, ds)).SOPInstanceUID == ds.SOPInstanceUID


# -- stored: only a pipeline can tell ------------------------------------------------------

def _routed(node: NodeProcess, series_uid: str) -> Series:
    return wait_for(lambda: (row := _series_rows(node).get(series_uid)) is not None
                    and row.state in ("routed", "skipped") and row, timeout=60)


@pytest.mark.parametrize("case", ["absurd_dimensions", "short_pixel_buffer", "undecodable_jpeg"])
def test_data_set_only_a_pipeline_can_judge_is_stored_and_routed(node: NodeProcess, work: Path, case: str) -> None:
    syntax = JPEGBaseline8Bit if case == "undecodable_jpeg" else ExplicitVRLittleEndian

    def bad(study: str) -> Path:
        ds = _instance(study, 7)
        if case == "absurd_dimensions":
            ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, "2147483647"
        elif case == "short_pixel_buffer":
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 * 2]
        else:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not really a JPEG stream \xff\xd9"])
            ds["PixelData"].VR = "OB"
        return _write(ds, work / "bad.dcm", syntax)
    contexts = ((CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]), (CT_IMAGE_STORAGE, [syntax]))
    status, goods = _sandwich(node, work, bad, contexts)
    assert status == 0
    stored = _stored(node, _instance(derive_uid("hostile", work.name), 7))
    assert stored.is_file()
    # The jobs stage turns the failure into a readable audit row; here: it was routed.
    row = _routed(node, goods[0].SeriesInstanceUID)
    assert row.state == "routed" and row.instance_count == 3


# -- peers that break the protocol ---------------------------------------------------------

def test_association_dropped_mid_transfer_leaves_no_partial_file(node: NodeProcess, work: Path) -> None:
    ds = _instance(derive_uid("hostile", work.name), 7)
    data = _encoded(ds)
    sock = raw_associate(node.port)
    sock.sendall(pdata_pdu(1, store_command(CT_IMAGE_STORAGE, ds.SOPInstanceUID), command=True, last=True))
    sock.sendall(pdata_pdu(1, data[: len(data) // 2], command=False, last=False))
    time.sleep(0.5)  # let the node write the first half to its temporary file
    sock.close()
    wait_for(lambda: _incoming_empty(node), timeout=30)
    assert not _stored(node, ds).exists()
    aborted = wait_for(lambda: [e for e in _events(node, "association.aborted")
                                if e.message == "connection closed without release"], timeout=30)
    assert aborted[-1].details["instances_received"] == 0


def test_pdu_claiming_two_gigabytes_then_silence(node: NodeProcess) -> None:
    """A P-DATA-TF that claims 2 GiB, sends 1 KiB and closes: no allocation, no crash."""
    sock = raw_associate(node.port)
    sock.sendall(struct.pack(">BBL", 0x04, 0, 0x7FFFFFF0) + b"\0" * 1024)
    time.sleep(0.3)
    sock.close()
    wait_for(lambda: _incoming_empty(node), timeout=30)


def test_garbage_instead_of_an_association_request(node: NodeProcess) -> None:
    for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x01\x00\xff\xff\xff\xff" + os.urandom(64),
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):  # a TLS hello on a plain port
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(payload)
            sock.settimeout(10)
            try:
                sock.recv(64)
            except (TimeoutError, ConnectionError):
                pass
    # Audited, counted per host and interval (not a row per connection).
    wait_for(lambda: [e for e in _events(node, "association.rejected") if e.message == "no valid A-ASSOCIATE-RQ"],
             timeout=30)


def test_silent_and_stalled_peers_are_dropped_after_the_timeouts(tmp_path: Path) -> None:
    """A peer that connects and says nothing, and one that stops in the middle of a data set."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    env = {"SPINE_NODE_DICOM__ACSE_TIMEOUT_S": "2", "SPINE_NODE_DICOM__NETWORK_TIMEOUT_S": "3",
           "SPINE_NODE_DICOM__DIMSE_TIMEOUT_S": "3"}
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        silent = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        ds = _instance(derive_uid("hostile", "stalled"), 1)
        data = _encoded(ds)
        stalled = raw_associate(node.port)
        stalled.sendall(pdata_pdu(1, store_command(CT_IMAGE_STORAGE, ds.SOPInstanceUID), command=True, last=True))
        stalled.sendall(pdata_pdu(1, data[: len(data) // 2], command=False, last=False))
        try:
            for sock in (silent, stalled):
                sock.settimeout(30)
                received = b""
                while chunk := sock.recv(1024):  # the node sends an A-ABORT or just closes
                    received += chunk
                assert not received or received[:1] == b"\x07", received  # nothing, or an A-ABORT
        finally:
            silent.close()
            stalled.close()
        wait_for(lambda: _incoming_empty(node), timeout=30)
        assert not _stored(node, ds).exists()
        assert echo_ok(node.port)
