"""Transport tuning for the receive hot path, on top of pynetdicom's own transport.

pynetdicom reads a PDU 4 KiB per ``recv`` call, growing a bytearray: a 0.5 MB CT slice
costs over a hundred Python-level calls on the DUL thread. :class:`FastSocket` reads a
PDU with a few ``recv_into`` calls into a buffer that grows with the data that arrived
(never sized from the length a peer claims). :class:`FastRequestHandler` gives it to every
association the server accepts; pynetdicom's protocol handling is unchanged.

(Replacing the DUL thread's 1 ms polling sleep by a ``select`` on the socket and a wake-up
pipe was tried as well: no difference measurable on the benchmark machine, so not kept.)
"""

from __future__ import annotations

import socket
from typing import Any, cast

from pynetdicom.transport import AssociationSocket, RequestHandler

_RECV_CHUNK = 1 << 20


class FastSocket(AssociationSocket):
    """pynetdicom's association socket with a bulk ``recv``."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray()
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buffer):
                buffer.extend(bytes(min(nr_bytes - nr_read, max(_RECV_CHUNK, nr_read))))
            with memoryview(buffer) as view:
                count = sock.recv_into(view[nr_read:])
            if not count:  # connection closed: return what we have, as the stock recv does
                del buffer[nr_read:]
                return buffer
            nr_read += count
        return buffer


class FastRequestHandler(RequestHandler):
    """pynetdicom's request handler, with :class:`FastSocket` on every association."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = FastSocket
        return assoc
