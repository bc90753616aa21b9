"""UID validation and deterministic derivation.

Every UID is validated before it becomes part of a path (DESIGN decision 4), and result
UIDs are derived from their inputs (decision 3), so a re-run reproduces the same UIDs.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from spine_node.node.errors import InvalidUIDError

# PS3.5 9.1: components of digits separated by '.', no leading zeros (except '0'), <= 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX_LEN = 64


def is_valid_uid(value: object) -> bool:
    """Return True if ``value`` is a syntactically valid DICOM UID."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= UID_MAX_LEN
        and _UID_RE.match(value) is not None
    )


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise :class:`InvalidUIDError`.

    The error message never echoes more than a short, sanitised prefix of the bad value,
    since a hostile peer controls it.
    """
    if is_valid_uid(value):
        return str(value)
    raise InvalidUIDError(
        f"invalid {what} {_describe(value)}: expected digits and dots, no leading zeros, at most "
        f"{UID_MAX_LEN} characters"
    )


def _describe(value: object) -> str:
    """Say what is wrong with a bad UID without echoing it, unless it is only digits and dots.

    A hostile or broken peer controls the value, and a device that builds UIDs from an
    accession number or patient ID would put that into the log.
    """
    if not isinstance(value, str):
        return f"(a {type(value).__name__}, not text)"
    if not value:
        return "(empty)"
    if re.fullmatch(r"[0-9.]{1,80}", value):
        return repr(value)
    kinds = []
    if "/" in value or ".." in value:
        kinds.append("path characters")
    if "\\" in value:
        kinds.append("several values")
    if any(ch.isalpha() for ch in value):
        kinds.append("letters")
    if any(not (ch.isalnum() or ch in "./\\") for ch in value):
        kinds.append("other characters")
    return f"({len(value)} characters, with {' and '.join(kinds) or 'misplaced dots'})"


def derive_uid(*parts: str) -> str:
    """Derive a UUID-based ``2.25.`` UID from ``parts`` (deterministic, collision-safe).

    The parts are joined with a separator that cannot appear in a UID, hashed with
    SHA-256 and the first 128 bits turned into a version-5-style UUID integer.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    value = uuid.UUID(bytes=digest[:16], version=5).int
    return f"2.25.{value}"
