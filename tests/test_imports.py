"""The house as drawn from its imports: layers point one way."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth (lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_inference_never_imports_the_node() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(m for m in imported_modules(path)
                                            if m == "spine_node.node" or m.startswith("spine_node.node."))
        for path in (REPO / "inference").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_imports_the_old_top_level_names() -> None:
    old = ("node", "inference", "engines", "migrations")
    offenders = []
    for folder in ("node", "inference", "engines", "migrations", "spine_node", "tests", "bench", "docker"):
        for path in (REPO / folder).rglob("*.py"):
            bad = [m for m in imported_modules(path) if m.split(".")[0] in old]
            if bad:
                offenders.append((str(path.relative_to(REPO)), bad))
    assert offenders == []
