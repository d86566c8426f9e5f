"""Checks that a virtualenv holds exactly what its hashed lock files pin, nothing more or less.

Run with the venv's own interpreter: `VENV/bin/python scripts/check_venv.py LOCK [LOCK ...]`.
Exit 1, naming every difference, when a pinned distribution is missing or at another version,
when something not pinned was installed (a resolver reached past the lock), or when the
installed set does not satisfy its own requirements (`pip check`: the lock is incomplete).

Written after a fresh machine's pip resolved `granian[reload]>=2.7.4` to a release newer than
the lock: bootstrap now installs with --no-deps, and this check is what would have caught it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Installed by bootstrap itself, outside the locks: the pinned installer, the pinned build
# backend of the editable install, and this project.
OWN = {"pip", "setuptools", "listeners", "listeners-bridge"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            found[canonical(match.group(1))] = match.group(2)
    return found


def main(locks: list[str]) -> int:
    wanted: dict[str, str] = {}
    for lock in locks:
        wanted.update(pins(Path(lock)))
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = [
        f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
        for name, version in sorted(wanted.items())
        if installed.get(name) != version and name not in OWN
    ]
    problems += [
        f"{name} {version}: installed but in no lock"
        for name, version in sorted(installed.items())
        if name not in wanted and name not in OWN
    ]
    check = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        problems += [f"pip check: {line}" for line in check.stdout.splitlines() if line]
    for problem in problems:
        print(f"check_venv {sys.prefix}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: VENV/bin/python scripts/check_venv.py LOCK [LOCK ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
