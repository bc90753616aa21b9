"""Checks on pixel data before it is decoded: declared sizes, codestream headers, a budget.

A received file's Rows, Columns, Number of Frames and Bits Allocated are claims, and so is
the size a compressed frame's own header declares: a 1.4 KB JPEG 2000 slice may declare a
16384 x 16384 image (1 GiB decoded), a header may claim 65535 x 65535 pixels. Decoding
first and checking after costs the worker that memory (or kills it). :func:`check_pixel_data`
runs before decoding and raises :class:`~spine_node.inference.errors.PipelineError` with a
readable reason (sizes and frame numbers only, never values) when:

- Rows / Columns / Samples per Pixel / Bits Allocated / Number of Frames are missing or
  outside what DICOM allows,
- native pixel data is shorter than they say,
- an encapsulated frame is missing, or its codestream header (JPEG 2000 / HTJ2K SIZ,
  JPEG and JPEG-LS SOF, RLE header) declares another size, more components or more bits,
- the job's decoded pixels would exceed its budget (:func:`pixel_budget`; the worker sets
  it from ``worker.max_pixels_per_job``).

Torch-free and node-free: pipelines and the worker both call it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from spine_node.inference.errors import PipelineError

# Used where no budget is set (pipelines run outside a worker): 2 Gi samples.
DEFAULT_MAX_PIXELS = 1 << 31

_J2K_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
})
_JPEG_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
})
_RLE = "1.2.840.10008.1.2.5"
_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})
# JPEG start-of-frame markers (ITU T.81 B.1.1.3; 0xF7 is JPEG-LS SOF55).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
# How far into a frame its size header may lie (JP2 boxes, JPEG APPn segments).
_HEADER_SCAN = 64 << 10


@dataclass
class _Budget:
    limit: int
    used: int = 0


_budget: ContextVar[_Budget | None] = ContextVar("pixel_budget", default=None)


@contextmanager
def pixel_budget(max_pixels: int) -> Iterator[None]:
    """Within this block, every :func:`check_pixel_data` call draws on one budget of
    ``max_pixels`` decoded samples (one job)."""
    token = _budget.set(_Budget(max_pixels))
    try:
        yield
    finally:
        _budget.reset(token)


@dataclass(frozen=True)
class Declared:
    """What a data set says its pixel data is."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int

    @property
    def pixels(self) -> int:
        """Decoded samples (all frames)."""
        return self.rows * self.columns * self.frames * self.samples

    @property
    def native_bytes(self) -> int:
        return (self.pixels * self.bits_allocated + 7) // 8


def _int(ds: Any, keyword: str, default: int | None, low: int, high: int) -> int:
    try:
        raw = ds.get(keyword, None)
    except Exception:  # noqa: BLE001 - pydicom converts raw values on access and raises as it likes
        raise PipelineError(f"{keyword} is not a number") from None
    if raw is None or raw == "":
        if default is None:
            raise PipelineError(f"pixel data without {keyword}")
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise PipelineError(f"{keyword} is not a number") from None
    if not low <= value <= high:
        raise PipelineError(f"{keyword} {value} is outside {low}..{high}")
    return value


def declared(ds: Any) -> Declared:
    """The pixel geometry ``ds`` declares, each value checked against its DICOM range."""
    bits = _int(ds, "BitsAllocated", None, 1, 64)
    if bits not in (1, 8, 16, 32, 64):
        raise PipelineError(f"BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
    return Declared(rows=_int(ds, "Rows", None, 1, 65535), columns=_int(ds, "Columns", None, 1, 65535),
                    frames=_int(ds, "NumberOfFrames", 1, 1, 2**31 - 1),
                    samples=_int(ds, "SamplesPerPixel", 1, 1, 4), bits_allocated=bits)


def _charge(pixels: int, what: str) -> None:
    budget = _budget.get()
    limit = budget.limit if budget is not None else DEFAULT_MAX_PIXELS
    used = budget.used if budget is not None else 0
    if used + pixels > limit:
        raise PipelineError(f"{what}: {pixels} decoded pixel samples would take the job to {used + pixels}, "
                            f"over its budget of {limit} (worker.max_pixels_per_job)")
    if budget is not None:
        budget.used += pixels


def check_pixel_data(datasets: Iterable[Any], what: str = "") -> None:
    """Check each data set's pixel data before decoding it (see the module docstring).

    ``datasets``: pydicom data sets read with their pixel data; ``what`` names them in
    errors (a pipeline name, a file name). Data sets without pixel data are skipped.
    """
    for index, ds in enumerate(datasets):
        if "PixelData" not in ds:
            continue
        name = f"{what + ': ' if what else ''}instance {index + 1}"
        geometry = declared(ds)
        _charge(geometry.pixels, name)
        syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
        element = ds["PixelData"]
        if syntax in _NATIVE or not getattr(element, "is_undefined_length", False):
            length = len(element.value or b"")
            if length < geometry.native_bytes:
                raise PipelineError(f"{name}: pixel data holds {length} bytes; Rows {geometry.rows} x Columns "
                                    f"{geometry.columns} x {geometry.frames} frame(s) x {geometry.samples} "
                                    f"sample(s) at {geometry.bits_allocated} bits need {geometry.native_bytes}")
            continue
        _check_frames(element.value, syntax, geometry, name)


def _check_frames(value: bytes, syntax: str, geometry: Declared, name: str) -> None:
    frames = _frames(value, geometry.frames, name)
    if len(frames) < geometry.frames:
        raise PipelineError(f"{name}: Number of Frames is {geometry.frames} but the pixel data holds "
                            f"{len(frames)} frame(s)")
    for number, frame in enumerate(frames[:geometry.frames], start=1):
        if syntax in _J2K_SYNTAXES:
            size = _j2k_size(frame)
        elif syntax in _JPEG_SYNTAXES:
            size = _jpeg_size(frame)
        elif syntax == _RLE:
            _check_rle(frame, geometry, f"{name} frame {number}")
            continue
        else:
            continue  # no header this module reads: the decoder's output is checked by size
        if size is None:
            raise PipelineError(f"{name} frame {number}: no {_codec(syntax)} size header in the frame")
        rows, columns, components, precision = size
        if (rows, columns) != (geometry.rows, geometry.columns) or components != geometry.samples \
                or precision > geometry.bits_allocated:
            raise PipelineError(
                f"{name} frame {number}: the {_codec(syntax)} codestream declares {columns}x{rows} pixels, "
                f"{components} component(s) of {precision} bits; Rows/Columns/Samples per Pixel/BitsAllocated "
                f"say {geometry.columns}x{geometry.rows}, {geometry.samples}, {geometry.bits_allocated}")


def _codec(syntax: str) -> str:
    return "JPEG 2000" if syntax in _J2K_SYNTAXES else "JPEG" if syntax in _JPEG_SYNTAXES else "RLE"


def _items(value: bytes, name: str) -> list[memoryview]:
    """The items of encapsulated pixel data (the Basic Offset Table first), not copied."""
    view = memoryview(value)
    items, position, end = [], 0, len(value)
    while position + 8 <= end:
        group, element, length = struct.unpack_from("<HHL", value, position)
        position += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000) or length > end - position:
            raise PipelineError(f"{name}: encapsulated pixel data is not a sequence of fragments")
        items.append(view[position:position + length])
        position += length
    if not items:
        raise PipelineError(f"{name}: encapsulated pixel data has no Basic Offset Table item")
    return items


def _frames(value: bytes, count: int, name: str) -> list[bytes]:
    """The frames' first fragments (enough for their size headers)."""
    items = _items(value, name)
    table, fragments = items[0], items[1:]
    if count == 1:
        head = b""
        for fragment in fragments:  # a frame's header may span its first fragments
            head += bytes(fragment[:_HEADER_SCAN - len(head)])
            if len(head) >= _HEADER_SCAN:
                break
        return [head] if fragments else []
    if len(fragments) == count:
        return [bytes(fragment[:_HEADER_SCAN]) for fragment in fragments]
    if len(table) and len(table) % 4 == 0:
        # Offsets of each frame's first fragment, from the end of the table item.
        offsets = set(struct.unpack(f"<{len(table) // 4}L", table))
        starts, position = [], 0
        for fragment in fragments:
            if position in offsets:
                starts.append(bytes(fragment[:_HEADER_SCAN]))
            position += 8 + len(fragment)
        return starts
    # No table and not one fragment per frame: a frame starts where its codestream's
    # start marker is (JPEG SOI, JPEG 2000 SOC, a JP2 signature box).
    return [bytes(fragment[:_HEADER_SCAN]) for fragment in fragments
            if bytes(fragment[:2]) in (b"\xff\xd8", b"\xff\x4f") or bytes(fragment[4:8]) == b"jP  "]


def _j2k_size(frame: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, max precision) from the SIZ marker segment (ISO 15444-1 A.5.1)."""
    at = frame.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 4 + 38 > len(frame):
        return None
    (_lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz, _xt, _yt, _xto, _yto,
     csiz) = struct.unpack_from(">HHLLLLLLLLH", frame, at + 4)
    if xsiz <= xosiz or ysiz <= yosiz or csiz < 1 or at + 42 + 3 * csiz > len(frame):
        return 0, 0, csiz, 0
    precision = max((frame[at + 42 + 3 * index] & 0x7F) + 1 for index in range(csiz))
    return ysiz - yosiz, xsiz - xosiz, csiz, precision


def _jpeg_size(frame: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, precision) from the first SOFn segment (T.81 B.2.2, T.87)."""
    if frame[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            position += 2
            continue
        length = struct.unpack_from(">H", frame, position + 2)[0]
        if marker in _SOF_MARKERS:
            if position + 10 > len(frame):
                return None
            precision, rows, columns, components = struct.unpack_from(">BHHB", frame, position + 4)
            return rows, columns, components, precision
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        position += 2 + length
    return None


def _check_rle(frame: bytes, geometry: Declared, name: str) -> None:
    """The RLE header's segment count and offsets (PS3.5 G.5)."""
    if len(frame) < 64:
        raise PipelineError(f"{name}: RLE frame shorter than its 64-byte header")
    header = struct.unpack_from("<16L", frame, 0)
    expected = geometry.samples * max(geometry.bits_allocated // 8, 1)
    if header[0] != expected:
        raise PipelineError(f"{name}: RLE header declares {header[0]} segment(s); Samples per Pixel "
                            f"{geometry.samples} at {geometry.bits_allocated} bits need {expected}")
