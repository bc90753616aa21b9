from __future__ import annotations

from sqlalchemy import create_engine, inspect

from spine_node.node.db_migrate import current_head, downgrade, upgrade


def test_migrations_make_the_whole_schema(database_url):
    tables = set(inspect(create_engine(database_url)).get_table_names())
    assert {"associations", "series", "jobs", "results", "dispatches", "audit_events",
            "workers", "alembic_version"} <= tables
    downgrade(database_url, "base")
    assert inspect(create_engine(database_url)).get_table_names() == ["alembic_version"]
    upgrade(database_url)
    with create_engine(database_url).connect() as conn:
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    assert version == current_head()
