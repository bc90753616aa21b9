"""Alembic migrations: the only way the schema is made (``spine-node db upgrade``)."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
