"""The set-up is reproducible: every venv gets the pinned pip, installs its locks without a
resolver, and `scripts/check_venv.py` catches a venv that drifted from its locks.

A fresh machine's pip 23.2 once resolved Reflex's `granian[reload]>=2.7.4` to a release newer
than the lock, and the hashed install failed: these tests would have caught that.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def check_venv() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_venv", ROOT / "scripts" / "check_venv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(*locks: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_venv.py"), *map(str, locks)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_pins_are_read_with_extras_and_names_normalised(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text(
        "# comment\nGoogle_Cloud.Core==2.4.3 \\\n    --hash=sha256:aa\n"
        "granian[reload]==2.8.7 \\\n    --hash=sha256:bb\n    # via reflex\n"
    )
    assert check_venv().pins(lock) == {"google-cloud-core": "2.4.3", "granian": "2.8.7"}


def test_this_venv_matches_its_locks() -> None:
    result = run_check(
        ROOT / "requirements-dev.lock",
        ROOT / "requirements-browser.lock",
        ROOT / "deploy" / "build-requirements.lock",
    )
    assert result.returncode == 0, result.stderr


def test_a_drifted_venv_is_named(tmp_path: Path) -> None:
    """Another version than the lock's, and a distribution that no lock pins, are both caught."""
    locks = [ROOT / "requirements-browser.lock", ROOT / "deploy" / "build-requirements.lock"]
    drifted = tmp_path / "dev.lock"
    text = (ROOT / "requirements-dev.lock").read_text()
    text = re.sub(r"^pytest==\S+", "pytest==0.0.1", text, flags=re.M).replace("ruff==", "xruff==")
    drifted.write_text(text)
    result = run_check(drifted, *locks)
    assert result.returncode == 1
    assert "pytest: locked 0.0.1, installed" in result.stderr
    assert re.search(r"ruff \S+: installed but in no lock", result.stderr)


@pytest.mark.parametrize("path", ["scripts/bootstrap", "Dockerfile"])
def test_every_hashed_install_is_pinned_pip_and_no_resolver(path: str) -> None:
    text = (ROOT / path).read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if re.search(r"pip install .*(-r|\$lock)", line)]
    assert installs, f"no lock install found in {path}"
    for line in installs:
        assert "--no-deps" in line and "--require-hashes" in line, line
    # the pinned pip comes first, in every venv
    first = next(line for line in text.splitlines() if "pip install" in line)
    assert "requirements-pip.lock" in first
    assert "--upgrade pip" not in text  # an unpinned upgrade is what let the index move


def test_the_pinned_pip_is_the_one_bootstrap_installed() -> None:
    pinned = check_venv().pins(ROOT / "requirements-pip.lock")["pip"]
    for venv in (".venv", ".venv-tools", ".venv-reflex"):
        python = ROOT / venv / "bin" / "python"
        assert python.exists(), f"run scripts/bootstrap: it makes {venv}"
        version = subprocess.run(
            [str(python), "-m", "pip", "--version"], capture_output=True, text=True, check=True
        ).stdout.split()[1]
        assert version == pinned, f"{venv} has pip {version}, the lock pins {pinned}"
