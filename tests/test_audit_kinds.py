"""Audit event kinds: one convention, every kind written is a known one, old rows renamed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from sqlalchemy import create_engine, text

from spine_node.node.db_migrate import downgrade, upgrade
from spine_node.node.domain import EVENT_KINDS, kind_matches

REPO = Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"^[a-z]+\.[a-z]+$")


def _strings(node: ast.AST) -> list[str]:
    """String constants an expression can evaluate to (constants and both arms of ``a if c else b``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def kinds_written(path: Path) -> set[str]:
    """Kinds passed to record_event in ``path``: literals, or a name's literal assignments in the same function."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
        assigned: dict[str, list[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    pairs = (zip(target.elts, node.value.elts, strict=False)
                             if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                             else [(target, node.value)])
                    for name, value in pairs:
                        if isinstance(name, ast.Name):
                            assigned.setdefault(name.id, []).extend(_strings(value))
        for node in ast.walk(function):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "record_event"
                    and len(node.args) >= 2):
                kind = node.args[1]
                found.update(_strings(kind))
                if isinstance(kind, ast.Name):
                    found.update(assigned.get(kind.id, []))
    return found


def test_every_kind_written_is_a_known_dotted_kind() -> None:
    written: dict[str, set[str]] = {}
    for path in sorted((REPO / "node").glob("*.py")):
        for kind in kinds_written(path):
            written.setdefault(kind, set()).add(path.name)
    assert {"job.started", "dispatch.dead", "series.complete"} <= set(written)  # the walk sees them
    assert {k: sorted(v) for k, v in written.items() if k not in EVENT_KINDS} == {}
    assert [k for k in EVENT_KINDS if not DOTTED.match(k)] == []


def test_kind_prefixes() -> None:
    assert "job.started" in kind_matches("job") and "job.started" in kind_matches("job.")
    assert kind_matches("dispatch.dead") == ["dispatch.dead"]
    assert kind_matches("job_started") == [] and kind_matches("bogus") == []


def test_migration_renames_stored_kinds_and_back(database_url: str) -> None:
    engine = create_engine(database_url)
    downgrade(database_url, "0001")
    with engine.begin() as conn:
        for kind in ("job_started", "dispatch_dead", "series.complete"):
            conn.execute(text("INSERT INTO audit_events (at, kind, message) VALUES (CURRENT_TIMESTAMP, :k, '')"),
                         {"k": kind})
    upgrade(database_url)
    with engine.connect() as conn:
        kinds = sorted(conn.execute(text("SELECT kind FROM audit_events")).scalars())
    assert kinds == ["dispatch.dead", "job.started", "series.complete"]
    downgrade(database_url, "0001")
    with engine.connect() as conn:
        kinds = sorted(conn.execute(text("SELECT kind FROM audit_events")).scalars())
    assert kinds == ["dispatch_dead", "job_started", "series.complete"]
    engine.dispose()
