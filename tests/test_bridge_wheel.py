"""The `listeners-bridge` wheel, as a web app installs it (issue 29).

Built from clients/python/ alone, it holds the consumer and the contract, and depends on redis
and hiredis only. Installed into a clean venv with nothing else of this repository (no service,
no test kit, no editable path), it consumes a running service and converges.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud import firestore

from listeners.config import Settings
from tests.conftest import CONTROL_TOKEN, Firebase
from tests.test_bridge import truth
from tests.test_packaging import wheel_of
from tests.test_pipeline import serving

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = ROOT / "clients" / "python"
ALLOWED = {"redis", "hiredis"}

CONSUMER = """
import asyncio, importlib.util, json, sys
import listeners_bridge
from listeners_bridge import Bridge, Notifications, load_redis_settings

async def main(uid):
    print(json.dumps({"service_importable": importlib.util.find_spec("listeners") is not None,
                      "bridge_from": listeners_bridge.__file__}), flush=True)
    reducer = Notifications()
    async for event in Bridge(load_redis_settings()).events(uid):
        print(json.dumps({"type": event["type"], "items": reducer.apply(event)}), flush=True)

asyncio.run(main(sys.argv[1]))
"""


def build_wheel(out: Path) -> Path:
    # From a copy, so that setuptools' build/ and egg-info never land in the work tree.
    tree = out / "tree"
    shutil.copytree(BRIDGE, tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    return wheel_of(tree, out, "listeners_bridge-*.whl")


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist entries."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    return [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]


def pinned(lock: Path, names: set[str]) -> str:
    """The hashed pins of `names` from a lock file (each pin and its --hash lines)."""
    kept, keep = [], False
    for line in lock.read_text().splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            keep = line.split("==")[0].lower() in names
        if keep and not line.lstrip().startswith("#"):
            kept.append(line)
    return "\n".join(kept) + "\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("bridge-wheel"))


@pytest.fixture(scope="module")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv holding the pinned pip, redis and hiredis from the service's lock, and the wheel."""
    where = tmp_path_factory.mktemp("clean-venv")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    lock = where / "bridge.lock"
    lock.write_text(pinned(ROOT / "requirements.lock", ALLOWED))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for args in (
        ["--require-hashes", "--no-deps", "-r", str(ROOT / "requirements-pip.lock")],
        ["--require-hashes", "--no-deps", "--only-binary=:all:", "-r", str(lock)],
        ["--no-deps", str(wheel)],
    ):
        subprocess.run([python, "-m", "pip", "install", "--quiet", *args], check=True, timeout=300, env=env)
    # Python 3.11's venv brings setuptools; nothing here needs it
    subprocess.run(
        [python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, timeout=120, env=env
    )
    yield python


def test_the_wheel_holds_the_bridge_and_depends_on_redis_and_hiredis_only(wheel: Path) -> None:
    required = requirements(wheel)
    plain = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in required if "extra ==" not in r}
    assert plain == ALLOWED, required
    extras = {re.search(r'extra == "([^"]+)"', r).group(1) for r in required if "extra ==" in r}  # type: ignore[union-attr]
    assert extras == {"presence", "secret-manager"}, required
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"listeners_bridge", next(t for t in top if t.endswith(".dist-info"))}, top
    assert {"listeners_bridge/consumer.py", "listeners_bridge/events.py", "listeners_bridge/py.typed"} <= set(
        names
    )


def test_the_clean_venv_holds_nothing_else(clean_venv: Path) -> None:
    pip: list[str | Path] = [clean_venv, "-m", "pip"]
    listed = subprocess.run(
        [*pip, "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert installed == {"pip", "listeners-bridge", *ALLOWED}, installed
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout


class Consumer:
    """The consumer script in the clean venv: its output, a JSON line per event."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.first: dict[str, Any] = {}
        self.items: list[dict[str, Any]] = []
        self.types: list[str] = []

    async def read_until(self, want: list[dict[str, Any]], timeout: float = 60.0) -> None:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while self.items != want:
                line = await self.process.stdout.readline()
                assert line, "the consumer stopped"
                event = json.loads(line)
                if "items" in event:
                    self.items, self.types = event["items"], [*self.types, event["type"]]
                else:
                    self.first = event


@pytest.fixture
async def consumer(clean_venv: Path, settings: Settings, tmp_path: Path) -> AsyncIterator[Any]:
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    env = {  # what a web app's environment holds: the Redis keys, nothing of this repository
        "PATH": os.environ["PATH"],
        "LISTENERS_REDIS_HOST": settings.redis.host,
        "LISTENERS_REDIS_PORT": str(settings.redis.port),
        "LISTENERS_CONTROL_TOKEN": CONTROL_TOKEN,
    }
    started: list[Consumer] = []

    async def start(uid: str) -> Consumer:
        process = await asyncio.create_subprocess_exec(
            clean_venv, "-I", str(script), uid, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE
        )
        started.append(Consumer(process))
        return started[-1]

    yield start
    for one in started:
        if one.process.returncode is None:
            one.process.kill()
            await one.process.wait()


async def test_a_clean_venv_with_only_the_wheel_consumes_the_service_and_converges(
    settings: Settings, fb: Firebase, db: firestore.Client, consumer: Any
) -> None:
    await fb.notification("wanda", "before")
    async with serving(settings, fb) as service:
        await fb.online("wanda")
        reader: Consumer = await consumer("wanda")
        await reader.read_until(await asyncio.to_thread(truth, db, "wanda"))
        assert reader.first["service_importable"] is False, reader.first
        assert "clean-venv" in reader.first["bridge_from"], reader.first
        assert [i["doc_id"] for i in reader.items] == ["before"]
        await fb.notification("wanda", "live")
        await fb.update("clients/wanda/notifications/before", {"read": True})
        await reader.read_until(await asyncio.to_thread(truth, db, "wanda"))
        assert [i["doc_id"] for i in reader.items] == ["live"]
        assert "wanda" in service.node.sessions
        assert "notif.sync" in reader.types and "notif.add" in reader.types, reader.types
