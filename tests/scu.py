"""pynetdicom as a real (and, where asked, misbehaving) SCU for tests.

pynetdicom can send a file as it is: ``send_c_store(path)`` reads only the file meta
(for the SOP Class/Instance UIDs and the transfer syntax) and streams the rest of the
file as the data set, byte for byte. That is how the hostile tests put truncated or
corrupt data sets on the wire.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LITTLE_ENDIAN = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

# The peer under test is allowed to send non-conformant UIDs; the node must cope.
_config.ENFORCE_UID_CONFORMANCE = False
# send_c_store(path) streams the file's data set as it is instead of re-encoding it.
_config.STORE_SEND_CHUNKED_DATASET = True


@contextmanager
def association(
    port: int,
    contexts: Sequence[tuple[str, Sequence[str]]] = ((CT_IMAGE_STORAGE, LITTLE_ENDIAN),),
    *,
    calling: str = "HOSTILE",
    called: str = "SPINE_NODE",
    tls: ssl.SSLContext | None = None,
    max_pdu: int = 16382,
) -> Iterator[Association]:
    """An established association (Verification is always proposed too)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(Verification)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    tls_args = (tls, None) if tls is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionError(f"association not established with port {port}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def store(assoc: Association, item: Dataset | Path) -> int:
    """C-STORE ``item``; returns the status (-1 when no response came back)."""
    rsp = assoc.send_c_store(item)
    if rsp is None or "Status" not in rsp:
        return -1
    return int(rsp.Status)


def echo_ok(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """True if the node answers a C-ECHO with success."""
    ae = AE(ae_title="ECHO_PROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINE_NODE",
                         tls_args=(tls, None) if tls is not None else None)
    try:
        if not assoc.is_established:
            return False
        rsp = assoc.send_c_echo()
        return bool(rsp is not None and rsp.get("Status") == 0)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


# -- raw PDUs (PS3.8 9.3), for peers that break the protocol ---------------------------

def pdata_pdu(context_id: int, fragment: bytes, *, command: bool, last: bool) -> bytes:
    """One P-DATA-TF PDU carrying one PDV."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, header) + fragment
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """An encoded C-STORE-RQ command set (implicit VR little endian)."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    message.command_set.CommandDataSetType = 0x0001  # a data set follows
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def raw_associate(port: int, abstract_syntax: str = CT_IMAGE_STORAGE,
                  transfer_syntax: str = ExplicitVRLittleEndian, *, calling: str = "RAWPEER",
                  called: str = "SPINE_NODE", timeout: float = 15) -> socket.socket:
    """Open a TCP connection and negotiate one presentation context (id 1) by hand.

    Returns the connected socket after an A-ASSOCIATE-AC that accepts the context.
    """
    context = bytes([1, 0, 0, 0]) + _item(0x30, _uid(abstract_syntax)) + _item(0x40, _uid(transfer_syntax))
    user_info = _item(0x51, struct.pack(">L", 16384))
    variable = (_item(0x10, _uid("1.2.840.10008.3.1.1.1")) + _item(0x20, context) + _item(0x50, user_info))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + bytes(32) + variable)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
    header = _recv_exact(sock, 6)
    pdu_type, _, length = struct.unpack(">BBL", header)
    payload = _recv_exact(sock, length)
    if pdu_type != 0x02:
        sock.close()
        raise ConnectionError(f"association not accepted (PDU type 0x{pdu_type:02X})")
    # Find the presentation context AC item (0x21) and its result byte.
    offset = 68
    while offset < len(payload):
        item_type, _, item_len = struct.unpack(">BBH", payload[offset:offset + 4])
        if item_type == 0x21 and payload[offset + 6] != 0:
            sock.close()
            raise ConnectionError("presentation context rejected")
        offset += 4 + item_len
    return sock


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the node")
        data.extend(chunk)
    return bytes(data)


def raw_store(sock: socket.socket, sop_class: str, sop_instance: str, data_set: bytes,
              message_id: int = 1, fragment: int = 8192) -> int:
    """Send a C-STORE-RQ with ``data_set`` as raw bytes on context 1; return the status."""
    sock.sendall(pdata_pdu(1, store_command(sop_class, sop_instance, message_id), command=True, last=True))
    chunks = [data_set[i:i + fragment] for i in range(0, len(data_set), fragment)] or [b""]
    for index, chunk in enumerate(chunks):
        sock.sendall(pdata_pdu(1, chunk, command=False, last=index == len(chunks) - 1))
    return read_status(sock)


def read_status(sock: socket.socket) -> int:
    """Read one P-DATA-TF PDU holding a response command set; return its Status."""
    pdu_type, _, length = struct.unpack(">BBL", _recv_exact(sock, 6))
    payload = _recv_exact(sock, length)
    if pdu_type != 0x04:
        raise ConnectionError(f"expected P-DATA-TF, got PDU type 0x{pdu_type:02X}")
    command = bytearray()
    offset = 0
    while offset < len(payload):
        pdv_len = struct.unpack(">L", payload[offset:offset + 4])[0]
        command += payload[offset + 6:offset + 4 + pdv_len]
        offset += 4 + pdv_len
    ds = decode(BytesIO(bytes(command)), True, True)
    return int(ds.Status)


def release(sock: socket.socket) -> None:
    """A-RELEASE-RQ, wait for the RP, close."""
    try:
        sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))
        _recv_exact(sock, 10)
    finally:
        sock.close()


def write_with_meta(ds: Dataset, path: Path, *, meta_sop_instance: str) -> Path:
    """Write ``ds`` as a file whose File Meta names another SOP Instance UID.

    pydicom's own writer keeps the meta consistent with the data set; a broken device
    does not. pynetdicom sends the meta's UID as the request's Affected SOP Instance UID.
    """
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info

    meta = Dataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7433.1.1"
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
        data = encode(ds, False, True)
        assert data is not None
        out.write(data)
    return path
