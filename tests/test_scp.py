"""The node's own upper layer (spine_node.node.scp): its codecs, its reader, and a live receiver in process.

Everything here is also exercised end to end by DCMTK and pynetdicom peers in
test_receive.py, test_hostile.py, test_concurrency.py and test_security.py; these tests
pin the parts a well-behaved peer never reaches.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_FIND_RQ
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode, encode

from spine_node.node.audit import Association, AuditEvent, Database
from spine_node.node.config import load_settings
from spine_node.node.db_migrate import upgrade
from spine_node.node.receive import Receiver
from spine_node.node.scp import (
    IMPLEMENTATION_CLASS_UID,
    PeerGone,
    _Reader,
    decode_command,
    file_meta,
    response_command,
)
from spine_node.node.uids import derive_uid
from tests.dicom_factory import real_ct
from tests.nodeproc import table_rows, wait_for
from tests.peers import dcmtk
from tests.scu import (
    CT_IMAGE_STORAGE,
    _recv_exact,
    pdata_pdu,
    raw_associate,
    raw_store,
    read_status,
    release,
    store_command,
)

# -- codecs ---------------------------------------------------------------------------------

def test_response_command_is_a_dimse_command_set_pydicom_reads() -> None:
    sop = derive_uid("scp-test", "instance")
    raw = response_command(0x8001, 7, 0xC210, CT_IMAGE_STORAGE, sop, "malformed data set: \x00bad\x7f" + "x" * 80)
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xC210)
    assert ds.CommandDataSetType == 0x0101
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CT_IMAGE_STORAGE, sop)
    assert ds.ErrorComment == "malformed data set: bad" + "x" * 41  # printable ASCII, 64 at most
    ok = decode(BytesIO(response_command(0x8030, 1, 0x0000, comment="ignored")), True, True)
    assert ok.Status == 0 and "ErrorComment" not in ok and "AffectedSOPInstanceUID" not in ok


def test_decode_command_reads_what_pynetdicom_encodes() -> None:
    sop = derive_uid("scp-test", "decode")
    values = decode_command(store_command(CT_IMAGE_STORAGE, sop, message_id=513))
    assert struct.unpack("<H", values[0x0100])[0] == 0x0001
    assert struct.unpack("<H", values[0x0110])[0] == 513
    assert values[0x1000].rstrip(b"\0").decode() == sop


def test_file_meta_makes_a_file_pydicom_reads(tmp_path: Path) -> None:
    ds = real_ct()
    data = encode(ds, False, True)
    assert data is not None
    path = tmp_path / "x.dcm"
    path.write_bytes(file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "MOD\\ALITY\x00") + data)
    back = dcmread(path)
    meta = back.file_meta
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "MODALITY"
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.pixel_array.shape == (ds.Rows, ds.Columns)


@pytest.mark.parametrize("pieces", [[b"a" * 10], [b"ab", b"cdefgh", b"ij"], [b"x" * 3_000_000]])
def test_reader_passes_exactly_what_was_asked(pieces: list[bytes]) -> None:
    left, right = socket.socketpair()
    reader = _Reader(left, size=1 << 16)  # smaller than the 3 MB piece: streamed through
    payload = b"".join(pieces)

    def send() -> None:
        for piece in pieces:
            right.sendall(piece)
        right.sendall(b"tail")
        right.close()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = bytearray()
        reader.stream(len(payload), got.extend)
        assert bytes(got) == payload
        assert reader.read(4) == b"tail"
        with pytest.raises(PeerGone):  # the peer went away: an end, never a short read
            reader.read(1)
    finally:
        sender.join(10)
        left.close()


# -- a live receiver in this process ----------------------------------------------------------

@pytest.fixture
def live(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    options = getattr(request, "param", {})
    settings = load_settings(
        dicom={"host": "127.0.0.1", "port": 0, **options.get("dicom", {})},
        storage={"data_dir": tmp_path / "node", "min_free_mb": 0, **options.get("storage", {})},
        database_url=url,
    )
    receiver = Receiver(settings, Database(url))
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def _ct(tag: str) -> tuple[str, bytes, Path]:
    ds = real_ct()
    ds.StudyInstanceUID = derive_uid("scp-test", tag, "study")
    ds.SeriesInstanceUID = derive_uid("scp-test", tag, "series")
    ds.SOPInstanceUID = derive_uid("scp-test", tag)
    data = encode(ds, False, True)
    assert data is not None
    return ds.SOPInstanceUID, data, Path(ds.StudyInstanceUID) / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _find_command() -> bytes:
    """A C-FIND-RQ command set (pynetdicom's encoder) that says no data set follows."""
    primitive = C_FIND()
    primitive.MessageID = 2
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    primitive.Priority = 0
    primitive.Identifier = BytesIO(b"")
    message = C_FIND_RQ()
    message.primitive_to_message(primitive)
    message.command_set.CommandDataSetType = 0x0101
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def _abort_reason(sock: socket.socket) -> int:
    header = _recv_exact(sock, 6)
    assert header[0] == 0x07, f"expected an A-ABORT, got PDU type 0x{header[0]:02X}"
    body = _recv_exact(sock, struct.unpack(">L", header[2:])[0])
    return body[3]


def test_store_then_unsupported_command_then_store_on_one_association(live: Receiver) -> None:
    sock = raw_associate(live.port)
    try:
        first, data, where = _ct("first")
        assert raw_store(sock, CT_IMAGE_STORAGE, first, data) == 0x0000
        # A C-FIND-RQ (no data set) on the storage context: "unrecognized operation", and
        # the association goes on.
        sock.sendall(pdata_pdu(1, _find_command(), command=True, last=True))
        assert read_status(sock) == 0x0211
        second, data2, where2 = _ct("second")
        assert raw_store(sock, CT_IMAGE_STORAGE, second, data2, message_id=3, fragment=100_000) == 0x0000
    finally:
        release(sock)
    assert (live.spool.root / where).read_bytes().endswith(data)
    assert (live.spool.root / where2).read_bytes().endswith(data2)
    rows = wait_for(lambda: [a for a in table_rows(live.db.url, Association) if a.state == "released"])
    assert rows[0].instances_received == 2 and rows[0].calling_ae_title == "RAWPEER"


@pytest.mark.parametrize("breach", ["data before command", "unaccepted context", "unknown PDU type"])
def test_protocol_breaches_are_aborted_and_leave_nothing(live: Receiver, breach: str) -> None:
    sop, data, where = _ct(breach)
    sock = raw_associate(live.port)
    try:
        if breach == "data before command":
            sock.sendall(pdata_pdu(1, data[:1000], command=False, last=False))
        elif breach == "unaccepted context":
            sock.sendall(pdata_pdu(1, store_command(CT_IMAGE_STORAGE, sop), command=True, last=True))
            sock.sendall(pdata_pdu(1, data[:1000], command=False, last=False))
            sock.sendall(pdata_pdu(3, data[1000:2000], command=False, last=True))
        else:
            sock.sendall(struct.pack(">BBL", 0x09, 0, 4) + bytes(4))
        reason = _abort_reason(sock)
    finally:
        sock.close()
    assert reason in (0x01, 0x02, 0x06)
    wait_for(lambda: not any((live.spool.root / ".incoming").iterdir()))
    assert not (live.spool.root / where).exists()
    aborted = wait_for(lambda: [e for e in table_rows(live.db.url, AuditEvent) if e.kind == "association.aborted"])
    assert aborted[0].message == "peer or network aborted"
    with raw_associate(live.port) as again:  # and the node goes on accepting
        assert raw_store(again, CT_IMAGE_STORAGE, sop, data) == 0x0000


@pytest.mark.parametrize("live", [{"dicom": {"max_associations": 2}}], indirect=True)
def test_association_over_the_limit_is_rejected_transiently(live: Receiver) -> None:
    held = [raw_associate(live.port), raw_associate(live.port)]
    try:
        with pytest.raises(ConnectionError, match="PDU type 0x03"):
            raw_associate(live.port)
    finally:
        for sock in held:
            release(sock)
    rejected = wait_for(lambda: [a for a in table_rows(live.db.url, Association) if a.state == "rejected"])
    assert rejected[0].reason == "association limit reached"
    # The slots are given back when associations end.
    sock = raw_associate(live.port)
    release(sock)


@pytest.mark.parametrize("live", [{"storage": {"sync_before_answer": True}},
                                  {"storage": {"sync_before_answer": False}}], indirect=True)
def test_sync_before_answer_decides_whether_the_file_is_synced(live: Receiver,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    sop, data, where = _ct("sync")
    sock = raw_associate(live.port)
    try:
        assert raw_store(sock, CT_IMAGE_STORAGE, sop, data) == 0x0000
    finally:
        release(sock)
    assert (live.spool.root / where).read_bytes().endswith(data)
    assert len(synced) == (1 if live.settings.storage.sync_before_answer else 0)


def _large_ct(tag: str, tail: bytes) -> tuple[str, bytes, Path]:
    """A 512x512 CT data set (more than the head kept in memory) with ``tail`` after its pixels."""
    ds = real_ct()
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes(range(256)) * 2048
    ds.StudyInstanceUID = derive_uid("scp-test", tag, "study")
    ds.SeriesInstanceUID = derive_uid("scp-test", tag, "series")
    ds.SOPInstanceUID = derive_uid("scp-test", tag)
    data = encode(ds, False, True)
    assert data is not None
    return (ds.SOPInstanceUID, data + tail,
            Path(ds.StudyInstanceUID) / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")


def test_elements_past_the_head_are_checked_through_the_file(live: Receiver) -> None:
    """The header check reads the kept beginning; what lies past it (here after 512 KB of
    pixels) is read from the file: a sound trailing element is stored, a broken one refused."""
    padding = struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, 4) + b"\0" * 4
    good, good_data, good_where = _large_ct("trailing-good", padding)
    broken_tail = struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, 4096) + b"\0" * 4
    bad, bad_data, bad_where = _large_ct("trailing-bad", broken_tail)
    sock = raw_associate(live.port)
    try:
        assert raw_store(sock, CT_IMAGE_STORAGE, good, good_data) == 0x0000
        assert raw_store(sock, CT_IMAGE_STORAGE, bad, bad_data, message_id=2) == 0xC210
    finally:
        release(sock)
    assert (live.spool.root / good_where).read_bytes().endswith(good_data)
    assert not (live.spool.root / bad_where).exists()
    # Neither the refused file nor the one made ahead for a next C-STORE is left behind.
    wait_for(lambda: [a for a in table_rows(live.db.url, Association) if a.state == "released"])
    assert not list(live.incoming_dir.iterdir())


# -- association requests: called AE title, context IDs, hostile AE titles ---------------------------

def _associate_rq(called: bytes = b"SPINE_NODE", calling: bytes = b"RAWPEER",
                  context_ids: tuple[int, ...] = (1,)) -> bytes:
    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(payload)) + payload
    contexts = b"".join(item(0x20, bytes([cid, 0, 0, 0]) + item(0x30, CT_IMAGE_STORAGE.encode())
                             + item(0x40, ExplicitVRLittleEndian.encode())) for cid in context_ids)
    variable = item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + item(0x50, item(0x51, struct.pack(">L", 16384)))
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32) + variable
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _answer(port: int, request: bytes) -> bytes:
    """The node's first PDU (header and body) in answer to ``request``."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        header = _recv_exact(sock, 6)
        return header + _recv_exact(sock, struct.unpack(">L", header[2:])[0])


def test_wrong_called_ae_title_is_rejected(live: Receiver) -> None:
    wrong = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "WRONG", "127.0.0.1", str(live.port)],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "rejected" in (wrong.stdout + wrong.stderr).lower()
    right = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "127.0.0.1",
                            str(live.port)], capture_output=True, text=True, timeout=60)
    assert right.returncode == 0, right.stderr
    # A-ASSOCIATE-RJ: rejected permanent (1), by the service user (1), called AE title not recognized (7)
    assert _answer(live.port, _associate_rq(called=b"WRONG"))[:10] == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 7])
    rows = wait_for(lambda: [a for a in table_rows(live.db.url, Association)
                             if a.reason == "called AE title not recognized"])
    assert rows[0].called_ae_title == "WRONG" and rows[0].calling_ae_title == "MODALITY"


@pytest.mark.parametrize("live", [{"dicom": {"check_called_ae_title": False}}], indirect=True)
def test_called_ae_title_check_can_be_turned_off(live: Receiver) -> None:
    assert _answer(live.port, _associate_rq(called=b"ANY-SCP"))[0] == 0x02


def test_duplicate_presentation_context_ids_are_rejected(live: Receiver) -> None:
    answer = _answer(live.port, _associate_rq(context_ids=(1, 3, 1)))
    assert answer[0] == 0x03, f"expected an A-ASSOCIATE-RJ, got PDU type 0x{answer[0]:02X}"
    rows = wait_for(lambda: [a for a in table_rows(live.db.url, Association)
                             if a.reason == "duplicate presentation context IDs"])
    assert rows[0].state == "rejected"


@pytest.mark.parametrize("live", [{"dicom": {"allowed_calling_ae_titles": ["MODALITY"]}}], indirect=True)
def test_hostile_calling_ae_titles_are_escaped_in_the_log_and_audited(live: Receiver,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    hostile = [b"EV\x00L", b"\x1b[2J\x1b]0;X\x07", b"A\xff\xfeB", b"C\\D"]
    with caplog.at_level("INFO"):
        for calling in hostile:
            answer = _answer(live.port, _associate_rq(calling=calling))
            assert answer[0] in (0x03, 0x07), answer[:10]  # rejected, or aborted as undecodable
        rows = wait_for(lambda: len(rows := [a for a in table_rows(live.db.url, Association)
                                             if a.state == "rejected"]) == len(hostile) and rows)
    titles = sorted(row.calling_ae_title for row in rows)
    assert titles == sorted(["EV\\x00L", "\\x1b[2J\\x1b]0;X", "A\\xff\\xfeB", "C\\x5cD"]), titles
    text = caplog.text
    assert not any(ch in text for ch in "\x00\x1b\x07\xff\xfe"), "raw control bytes reached the log"
    assert "EV\\x00L" in text
