"""What the service's wheel ships: the service, and none of the test kit.

The stand-ins, the proxy, the network namespaces, the local token issuer and the demo live
in `src/listeners_testkit/`, importable in development through the editable install; the
wheel (and so the image, which installs it) must not contain them (issue 24).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTKIT_MODULES = {p.stem for p in (ROOT / "src" / "listeners_testkit").glob("*.py")} - {"__init__"}


def build_wheel(tmp_path: Path) -> Path:
    # Built from a copy, so that setuptools' build/ and egg-info never land in the work tree.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    return wheel_of(tree, tmp_path / "wheel", "listeners-*.whl")


def wheel_of(tree: Path, out: Path, pattern: str) -> Path:
    """The wheel pip builds from the project in `tree`, without its dependencies."""
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    subprocess.run([sys.executable, "-m", "pip", *build], cwd=tree, check=True, timeout=300)
    (wheel,) = out.glob(pattern)
    return wheel


def test_the_wheel_holds_the_service_and_no_test_kit(tmp_path: Path) -> None:
    names = zipfile.ZipFile(build_wheel(tmp_path)).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"listeners", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "listeners/service.py" in names and "listeners/deliver/static/listeners-client.js" in names
    shipped = {Path(name).stem for name in names if name.endswith(".py")}
    assert not TESTKIT_MODULES & (shipped - {"auth"}), TESTKIT_MODULES & shipped
    assert not [n for n in names if "testkit" in n or "/local/" in n or n.endswith("rtdb_server.py")]
    assert {"rtdb_server", "proxy", "netns", "auth", "processes", "demo"} <= TESTKIT_MODULES
