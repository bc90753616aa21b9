"""The spool: ``<spool>/<study>/<series>/<sop>.dcm``, written atomically.

Files are written to a temporary name in the target folder, flushed and renamed into
place, so a reader never sees a partial file and a re-sent instance replaces the old
one in one step. Every path component is a validated UID.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from spine_node.node.errors import OutOfSpaceError, SpoolError
from spine_node.node.uids import validate_uid

_COPY_CHUNK = 1 << 20


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self._root = str(self.root)
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def _series_folder(self, study_uid: str, series_uid: str) -> str:
        # Plain strings: receive places every instance through here before answering it.
        return os.path.join(self._root, validate_uid(study_uid, "Study Instance UID"),
                            validate_uid(series_uid, "Series Instance UID"))

    def _instance_file(self, folder: str, sop_uid: str) -> str:
        return os.path.join(folder, validate_uid(sop_uid, "SOP Instance UID") + ".dcm")

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return Path(self._series_folder(study_uid, series_uid))

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return Path(self._instance_file(self._series_folder(study_uid, series_uid), sop_uid))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`OutOfSpaceError` if writing ``incoming`` bytes would go below the floor."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise OutOfSpaceError(
                f"spool {self.root} has {free // (1 << 20)} MiB free, "
                f"floor is {self.min_free_bytes // (1 << 20)} MiB"
            )

    def store(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        source: BinaryIO | bytes,
        size_hint: int = 0,
    ) -> tuple[Path, int]:
        """Write an instance atomically; return its path and the bytes written."""
        target = self.instance_path(study_uid, series_uid, sop_uid)
        self.check_space(size_hint)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", suffix=".part", dir=target.parent)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(source, (bytes, bytearray, memoryview)):
                    out.write(source)
                    written = len(source)
                else:
                    while chunk := source.read(_COPY_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, target)
        except OSError as exc:
            _unlink_quietly(tmp_name)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfSpaceError(f"spool {self.root} is full: {exc.strerror}") from exc
            raise SpoolError(f"cannot write instance into spool: {exc.strerror}") from exc
        except BaseException:
            _unlink_quietly(tmp_name)
            raise
        return target, written

    def adopt(self, study_uid: str, series_uid: str, sop_uid: str, temp_file: Path) -> Path:
        """Rename an already written file on the same volume into place."""
        target = self.instance_path(study_uid, series_uid, sop_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(temp_file, target)
        except OSError as exc:
            raise SpoolError(f"cannot move instance into spool: {exc.strerror}") from exc
        return target

    def adopt_instance(self, study_uid: str, series_uid: str, sop_uid: str, temp_file: str | Path,
                       keep_temp_name: bool = False) -> tuple[str, bool]:
        """Like :meth:`adopt`; also says whether an instance of that UID was replaced.

        New instances are hard-linked into place, which fails if the name exists: the
        check and the placing are one step, so the same instance racing in on two
        associations (or two receive processes) is counted once. ``keep_temp_name``: leave
        the temporary name of a new instance for the caller to remove (receive does it
        after answering; a name left by a crash is cleared at the next start).
        """
        folder = self._series_folder(study_uid, series_uid)
        target = self._instance_file(folder, sop_uid)
        try:
            try:
                try:
                    os.link(temp_file, target)
                except FileNotFoundError:  # the series' first instance: make its folder
                    os.makedirs(folder, exist_ok=True)
                    os.link(temp_file, target)
            except FileExistsError:
                os.replace(temp_file, target)
                return target, True
            if not keep_temp_name:
                _unlink_quietly(str(temp_file))
            return target, False
        except OSError as exc:
            raise SpoolError(f"cannot move instance into spool: {exc.strerror}") from exc

    @property
    def trash(self) -> Path:
        """Where series wait to be deleted (same volume, skipped by :meth:`iter_series`)."""
        return self.root / ".trash"

    def discard_series(self, study_uid: str, series_uid: str) -> Path | None:
        """Move a series folder out of the spool in one rename; returns its new place.

        The rename is atomic, so a reader (or a crash) sees the series either whole in
        the spool or gone; :meth:`empty_trash` deletes the files afterwards.
        """
        folder = self.series_dir(study_uid, series_uid)
        if not folder.is_dir():
            return None
        self.trash.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix=f"{series_uid}-", dir=self.trash))
        try:
            os.replace(folder, target / series_uid)
        except OSError as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise SpoolError(f"cannot remove series {series_uid} from the spool: {exc.strerror}") from exc
        try:
            folder.parent.rmdir()  # the study folder, if that was its last series
        except OSError:
            pass
        return target / series_uid

    def restore_series(self, study_uid: str, series_uid: str, discarded: Path) -> None:
        """Undo :meth:`discard_series`, keeping any instance received since."""
        folder = self.series_dir(study_uid, series_uid)
        folder.mkdir(parents=True, exist_ok=True)
        for item in discarded.iterdir():
            if not (folder / item.name).exists():
                os.replace(item, folder / item.name)
        shutil.rmtree(discarded.parent, ignore_errors=True)

    def empty_trash(self) -> None:
        if self.trash.is_dir():
            for item in self.trash.iterdir():
                shutil.rmtree(item, ignore_errors=True)

    def iter_series(self) -> Iterator[tuple[str, str, Path]]:
        """Every (study UID, series UID, folder) in the spool."""
        if not self.root.is_dir():
            return
        for study in sorted(self.root.iterdir()):
            if not study.is_dir() or study.name.startswith("."):
                continue
            for series in sorted(study.iterdir()):
                if series.is_dir() and not series.name.startswith("."):
                    yield study.name, series.name, series

    def size_bytes(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
