"""Real peers for tests: DCMTK, dicom3tools, Orthanc, Redis, PostgreSQL.

When a peer is missing the test is skipped with the reason, except under CI
(``SPINE_NODE_REQUIRE_PEERS=1``), where a missing peer fails the test: CI installs them.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

# pynetdicom installs console scripts named storescu/echoscu too; always use DCMTK's.
DCMTK_DIR = Path(os.environ.get("SPINE_NODE_DCMTK_DIR", "/usr/bin"))


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("SPINE_NODE_REQUIRE_PEERS") == "1":
        pytest.fail(f"required peer missing: {reason}")
    pytest.skip(reason)


# What a test that trains, exports or runs a torch model needs beyond ``pip install -e ".[dev]"``.
TRAIN_EXTRA = 'the training extra: pip install -e ".[train]" (CPU torch first where there is no GPU)'


def require_module(name: str, reason: str = TRAIN_EXTRA) -> ModuleType:
    """Import ``name`` for a test module or test, like ``pytest.importorskip``, but a module
    that is not installed fails instead of skipping under ``SPINE_NODE_REQUIRE_PEERS=1``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("SPINE_NODE_REQUIRE_PEERS") == "1":
            pytest.fail(f"required module {name} missing ({exc}); install {reason}", pytrace=False)
        pytest.skip(f"{name} not installed; needs {reason}", allow_module_level=True)


def dcmtk(tool: str) -> str:
    path = DCMTK_DIR / tool
    require(path.is_file(), f"DCMTK {tool} not installed (Debian package dcmtk)")
    return str(path)


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} not installed (Debian package {package})")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_url() -> str:
    url = os.environ.get(
        "SPINE_NODE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    )
    return url


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    admin_url = postgres_url()
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"spine_test_{uuid.uuid4().hex[:10]}"
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.OperationalError as exc:
        engine.dispose()
        require(False, f"PostgreSQL not reachable at {admin_url}: {exc.orig}")
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        engine.dispose()


def redis_url() -> str:
    return os.environ.get("SPINE_NODE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
