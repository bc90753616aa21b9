"""The wheel installs one import package, ``spine_node``, over the repository's folders."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the checkout's build/ (ignored by git): start from an empty one,
    # so files a previous build left there cannot stand in for missing ones.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    build = tmp_path_factory.mktemp("build")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=build)
    assert result.returncode == 0, result.stderr[-2000:]
    (found,) = out.glob("spine_node-*.whl")
    return found


def test_wheel_has_one_top_level_import_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"spine_node"}
    for package in ("node", "inference", "engines", "migrations"):
        assert f"spine_node/{package}/__init__.py" in names
    assert "spine_node/migrations/versions/0001_initial_schema.py" in names
    assert any(name.startswith("spine_node/engines/") and name.endswith("/model.onnx") for name in names)


def test_wheel_entry_point_names_the_namespaced_cli(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "spine-node = spine_node.node.cli:main" in text


def test_wheel_carries_every_package_folder(wheel: Path) -> None:
    """Every folder with an __init__.py under the mapped folders ships (the package list in
    pyproject.toml is explicit, so a new subpackage must be added there)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("node", "inference", "engines", "migrations"):
        for init in (REPO / folder).rglob("__init__.py"):
            assert f"spine_node/{init.relative_to(REPO).as_posix()}" in names, init
