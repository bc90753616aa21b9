"""The free-space budget (node/diskspace.py) on a real directory, its volume faked only
where the test needs an exact free figure."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from spine_node.node import diskspace
from spine_node.node.diskspace import SpaceGuard


@pytest.fixture
def volume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """A volume whose free bytes the test sets (the kernel's figure, looked up by the guard)."""
    state = SimpleNamespace(free=0, looks=0)

    def usage(path: object) -> SimpleNamespace:
        state.looks += 1
        return SimpleNamespace(total=1 << 30, used=0, free=state.free)

    monkeypatch.setattr(diskspace.shutil, "disk_usage", usage)
    return state


def test_charge_is_whole_blocks(tmp_path: Path) -> None:
    guard = SpaceGuard(tmp_path, floor_bytes=1)
    guard.block = 4096
    assert guard.charge(1, 0) == 4096  # a file's first byte takes a whole block
    assert guard.charge(100, 1) == 0  # still inside it
    assert guard.charge(4096, 4000) == 4096
    assert guard.charge(8192, 4096) == 8192
    assert guard.charge(0, 123) == 0


def test_writes_in_flight_stay_charged_across_a_fresh_look(tmp_path: Path, volume: SimpleNamespace) -> None:
    """Eight writes taken, none made yet: a fresh look at the volume (which cannot count them)
    must not hand their bytes out again."""
    block = 4096
    volume.free = 1000 * block
    guard = SpaceGuard(tmp_path, floor_bytes=900 * block, refresh_s=0.0)
    guard.block = block
    for _ in range(8):
        assert guard.take(10 * block)  # 80 blocks in flight, 20 left above the floor
    guard._checked_at = -1e9  # the next take looks again
    assert not guard.take(21 * block)
    assert guard.take(20 * block)
    # The writes land: the kernel counts them; the budget is the same figure seen from the volume.
    for _ in range(8):
        guard.landed(10 * block)
    guard.landed(20 * block)
    volume.free -= 100 * block
    guard._checked_at = -1e9
    assert not guard.take(1)
    volume.free += block
    guard._checked_at = -1e9
    assert guard.take(block)


def test_partial_blocks_cannot_sneak_past_the_floor(tmp_path: Path, volume: SimpleNamespace) -> None:
    """Many one-byte files each take a block on the volume; the guard charges them so."""
    block = 4096
    volume.free = 110 * block
    guard = SpaceGuard(tmp_path, floor_bytes=100 * block, refresh_s=3600)
    guard.block = block
    granted = sum(guard.take(1, 0) for _ in range(20))
    assert granted == 10


def test_no_floor_takes_everything(tmp_path: Path) -> None:
    guard = SpaceGuard(tmp_path, floor_bytes=0)
    assert guard.take(shutil.disk_usage(tmp_path).free * 2)
    guard.landed(10)
