"""The header check of a deflated data set, walked while it is inflated through a bounded window.

Deflated Explicit VR Little Endian (PS3.5 A.5) compresses the whole data set, so its
element headers can only be read by inflating it. pydicom inflates the whole data set
into memory first; a hostile peer's 11 MiB of deflated zeros (a "zip bomb", ratio 91)
then cost the receiver 2 GiB. Here the inflated bytes pass through a window of at most
:data:`WINDOW` bytes: element headers and the few identifying values are read from it,
everything else (pixel data, large values) is inflated and dropped. Memory per check is
a few hundred KiB whatever the data set claims; the work is bounded by
:data:`MAX_INFLATED` and :data:`MAX_INFLATE_RATIO`.

The walk follows :class:`spine_node.node.receive._StructureWalker` rule for rule (same
verdicts: malformed, pixel data present or not, identifying values).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from spine_node.node.header import HEADER_TAG_NUMBERS, HEADER_TAGS, InstanceInfo, clean_text, instance_info

# Inflated bytes held at once (the window) and compressed bytes read at once.
WINDOW = 64 << 10
INPUT_CHUNK = 64 << 10
# Refuse data sets that would inflate past this, or past MAX_INFLATE_RATIO times their
# deflated size once above 64 MiB (real DICOM deflates a few times over).
MAX_INFLATED = 1 << 30
MAX_INFLATE_RATIO = 100
_RATIO_FLOOR = 64 << 20
# An identifying value longer than this is invalid anyway; only its start is kept.
_MAX_CAPTURE = 64 << 10

_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQUENCE_END = (0xFFFE, 0xE0DD)
_PIXEL_TAGS = frozenset({(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)})
_MAX_NESTING = 32

ReadAt = Callable[[int, int], bytes]  # (offset, count) -> at most count bytes of the file


class DeflateMalformed(Exception):
    """The deflated data set is broken or too large; the message says how (no values)."""


class _Inflated:
    """The inflated data set as a forward-only stream, never more than a window in memory."""

    def __init__(self, read_at: ReadAt, start: int, size: int) -> None:
        self._read_at = read_at
        self._next_input = start
        self._size = size
        self.compressed = max(size - start, 0)
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = b""
        self._offset = 0  # read position in _buffer
        self.position = 0  # data set offset of _buffer[_offset]
        self.inflated = 0
        self._done = False

    def _fill(self) -> bool:
        """Inflate the next piece (at most WINDOW bytes) after what is left; False at the end."""
        inflater = self._inflater
        while not self._done:
            if inflater.unconsumed_tail:
                chunk = inflater.unconsumed_tail
            elif self._next_input < self._size:
                chunk = self._read_at(self._next_input, min(INPUT_CHUNK, self._size - self._next_input))
                if not chunk:
                    raise DeflateMalformed("deflated data set ends before its deflate stream does")
                self._next_input += len(chunk)
            else:
                chunk = b""
            try:
                out = inflater.decompress(chunk, WINDOW) if chunk else inflater.flush()
            except zlib.error as exc:
                raise DeflateMalformed(f"deflated data set does not inflate: {exc}") from None
            if inflater.eof or not chunk:
                self._done = True
                if not inflater.eof:
                    raise DeflateMalformed("deflated data set ends before its deflate stream does")
            if out:
                self.inflated += len(out)
                if self.inflated > MAX_INFLATED or (self.inflated > _RATIO_FLOOR
                                                    and self.inflated > MAX_INFLATE_RATIO * self.compressed):
                    raise DeflateMalformed(f"deflated data set of {self.compressed} bytes inflates past "
                                           f"{self.inflated} bytes")
                self._buffer = self._buffer[self._offset:] + out
                self._offset = 0
                return True
        return False

    def at_end(self) -> bool:
        return self._offset >= len(self._buffer) and not self._fill()

    def read(self, count: int) -> bytes | None:
        """The next ``count`` bytes, or None where the data set ends before them."""
        while len(self._buffer) - self._offset < count:
            if not self._fill():
                return None
        data = self._buffer[self._offset:self._offset + count]
        self._offset += count
        self.position += count
        return data

    def skip(self, count: int) -> bool:
        """Drop the next ``count`` bytes; False where the data set ends before them."""
        while True:
            available = len(self._buffer) - self._offset
            if count <= available:
                self._offset += count
                self.position += count
                return True
            count -= available
            self.position += available
            self._buffer, self._offset = b"", 0
            if not self._fill():
                return False


class _DeflatedWalker:
    def __init__(self, stream: _Inflated) -> None:
        self.stream = stream
        self.captured: dict[tuple[int, int], bytes] = {}

    def _header(self, implicit: bool) -> tuple[tuple[int, int], bytes, int]:
        at = self.stream.position
        raw = self.stream.read(8)
        if raw is None:
            raise DeflateMalformed(f"data set ends inside an element header at byte {at}")
        group, element, vr = struct.unpack_from("<HH2s", raw)
        if implicit or group == 0xFFFE:
            return (group, element), b"", struct.unpack_from("<L", raw, 4)[0]
        if vr in _LONG_LENGTH_VRS:
            more = self.stream.read(4)
            if more is None:
                raise DeflateMalformed(f"data set ends inside an element header at byte {at}")
            return (group, element), vr, struct.unpack("<L", more)[0]
        if vr.isalpha() and vr.isupper():
            return (group, element), vr, struct.unpack_from("<H", raw, 6)[0]
        raise DeflateMalformed(f"element ({group:04X},{element:04X}) has no valid VR")

    def _skip(self, length: int, what: str) -> None:
        at = self.stream.position
        if not self.stream.skip(length):
            raise DeflateMalformed(f"{what} claims {length} bytes at byte {at} but the data set ends at byte "
                                   f"{self.stream.position}")

    def dataset(self, implicit: bool, depth: int, in_item: bool) -> set[tuple[int, int]]:
        if depth > _MAX_NESTING:
            raise DeflateMalformed(f"sequences nested deeper than {_MAX_NESTING} levels")
        tags: set[tuple[int, int]] = set()
        while not self.stream.at_end():
            tag, vr, length = self._header(implicit)
            if tag == _ITEM_END and in_item:
                return tags
            if tag[0] == 0xFFFE:
                raise DeflateMalformed(f"unexpected delimiter ({tag[0]:04X},{tag[1]:04X})")
            tags.add(tag)
            name = f"element ({tag[0]:04X},{tag[1]:04X})"
            if length != _UNDEFINED:
                if depth == 0 and tag in HEADER_TAG_NUMBERS:
                    keep = min(length, _MAX_CAPTURE)
                    value = self.stream.read(keep)
                    if value is None:
                        raise DeflateMalformed(f"{name} claims {length} bytes but the data set ends first")
                    self.captured[tag] = value
                    self._skip(length - keep, name)
                else:
                    self._skip(length, name)
            elif tag in _PIXEL_TAGS and vr in (b"OB", b"OW"):
                self._fragments()
            elif implicit or vr in (b"SQ", b"UN"):
                self._sequence(implicit or vr == b"UN", depth)
            else:
                raise DeflateMalformed(f"{name} VR {vr.decode()} cannot have undefined length")
        if in_item:
            raise DeflateMalformed("data set ends inside a sequence item")
        return tags

    def _sequence(self, implicit: bool, depth: int) -> None:
        while True:
            tag, _vr, length = self._header(True)
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise DeflateMalformed(f"expected a sequence item, found ({tag[0]:04X},{tag[1]:04X})")
            if length == _UNDEFINED:
                self.dataset(implicit, depth + 1, in_item=True)
            else:
                self._skip(length, "sequence item")

    def _fragments(self) -> None:
        while True:
            tag, _vr, length = self._header(True)
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise DeflateMalformed("encapsulated pixel data holds something other than fragments")
            self._skip(length, "pixel data fragment")


def walk_deflated(read_at: ReadAt, start: int, size: int) -> tuple[bool, dict[str, str]]:
    """Walk the deflated data set at ``start`` of a file of ``size`` bytes read by ``read_at``.

    Returns whether it has top-level pixel data and its identifying values (keyword ->
    text, '' where absent). Raises :class:`DeflateMalformed` for a broken, truncated or
    oversized stream or data set.
    """
    stream = _Inflated(read_at, start, size)
    first = stream.read(2)
    if first == b"\x02\x00":
        raise DeflateMalformed("data set carries File Meta Information (group 0002) elements")
    # Start again: the two bytes were only a look ahead.
    stream = _Inflated(read_at, start, size)
    walker = _DeflatedWalker(stream)
    tags = walker.dataset(False, 0, in_item=False)
    values = dict.fromkeys(HEADER_TAGS, "")
    for tag, raw in walker.captured.items():
        values[HEADER_TAG_NUMBERS[tag]] = clean_text(raw.decode("latin-1"))
    return bool(tags & _PIXEL_TAGS), values


def inspect_deflated(read_at: ReadAt, start: int, size: int) -> tuple[bool, InstanceInfo]:
    """:func:`walk_deflated`, with the identifying values validated (raises
    :class:`~spine_node.node.header.StoreRejected` 0xC220 for bad UIDs)."""
    has_pixels, values = walk_deflated(read_at, start, size)
    return has_pixels, instance_info(values)
