from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A migrated, empty database on each supported engine."""
    from spine_node.node.db_migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
        upgrade(url)
        yield url
    else:
        with postgres_database() as url:
            upgrade(url)
            yield url
