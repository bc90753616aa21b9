"""Alembic revision scripts (a package so the wheel carries them as modules)."""
