from __future__ import annotations

import pytest

from spine_node.node.errors import InvalidUIDError, OutOfSpaceError
from spine_node.node.spool import Spool
from spine_node.node.uids import derive_uid, is_valid_uid, validate_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "0", "2.25.1234", "1." + "2" * 62])
def test_valid_uids(uid):
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    "uid", ["", "..", "1.2/3", "../../etc", "1..2", "1.02", "1.2.", "1" * 65, "1.2\x00", None, 12]
)
def test_hostile_uids_are_rejected(uid):
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError):
        validate_uid(uid)


def test_derived_uids_are_deterministic_and_valid():
    a = derive_uid("1.2.3", "model", "1.0")
    assert a == derive_uid("1.2.3", "model", "1.0")
    assert a != derive_uid("1.2.3", "model", "1.1")
    assert a.startswith("2.25.") and is_valid_uid(a)


def test_spool_write_is_atomic_and_replaces(tmp_path):
    spool = Spool(tmp_path)
    path, n = spool.store("1.2", "1.2.3", "1.2.3.4", b"first")
    assert path.read_bytes() == b"first" and n == 5
    spool.store("1.2", "1.2.3", "1.2.3.4", b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.dcm"], "no temp files left"


def test_spool_never_writes_outside_root(tmp_path):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUIDError):
        spool.store("1.2", "../../escape", "1", b"x")
    assert not any((tmp_path).glob("escape*"))


def test_spool_floor_raises_out_of_space(tmp_path):
    spool = Spool(tmp_path, min_free_bytes=1 << 62)
    with pytest.raises(OutOfSpaceError):
        spool.store("1.2", "1.2.3", "1.2.3.4", b"x")
    assert not any(tmp_path.rglob("*.dcm"))
