"""The browser package, clients/js: `npm pack` makes its tarball (the build runs as the
tarball's prepack step), and the tarball holds

- the very bytes the service serves at /assets/listeners-client.js (one source: the build
  copies the service's static file; nothing else writes the package's module);
- declarations whose event types are generated from docs/schemas, whose API names exactly the
  values the module exports, and against which a typed usage example (tests/js/usage.ts)
  compiles with `tsc --noEmit`, the package installed as a dependency;
- the README, with the API, the events, the order rules and the close codes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from listeners import __version__
from listeners.config import Settings
from listeners_bridge.events import EVENT_MODELS
from listeners_testkit.processes import free_port
from tests.test_browser import serving

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clients" / "js"
SERVED = ROOT / "src" / "listeners" / "deliver" / "static" / "listeners-client.js"
TSC = ROOT / "node_modules" / ".bin" / "tsc"
SHIPPED = {
    "package/package.json",
    "package/README.md",
    "package/dist/listeners-client.js",
    "package/dist/listeners-client.d.ts",
    "package/dist/events.d.ts",
}


def run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`npm pack` in clients/js, from a clean dist/; the tarball unpacked: its package dir."""
    shutil.rmtree(PACKAGE / "dist", ignore_errors=True)  # the prepack build must make it anew
    out = tmp_path_factory.mktemp("npm-pack")
    report = json.loads(
        run(["npm", "pack", "--json", "--ignore-scripts=false", "--pack-destination", str(out)], PACKAGE)
    )
    (entry,) = report
    tarball = out / entry["filename"]
    assert tarball.is_file()
    with tarfile.open(tarball) as archive:
        assert {m.name for m in archive.getmembers() if m.isfile()} == SHIPPED
        archive.extractall(out, filter="data")
    return out / "package"


async def test_the_package_module_is_the_served_module(packed: Path, settings: Settings) -> None:
    port = free_port()
    async with serving(settings, port), httpx.AsyncClient(timeout=30) as client:
        served = await client.get(f"http://127.0.0.1:{port}/assets/listeners-client.js")
    assert served.status_code == 200
    module = (packed / "dist" / "listeners-client.js").read_bytes()
    assert module == served.content == SERVED.read_bytes()


def test_the_package_describes_itself(packed: Path) -> None:
    manifest: dict[str, Any] = json.loads((packed / "package.json").read_text())
    assert manifest["version"] == __version__  # released with the service it comes from
    assert manifest["type"] == "module"
    assert manifest["exports"]["."] == {
        "types": "./dist/listeners-client.d.ts",
        "default": "./dist/listeners-client.js",
    }
    assert not manifest.get("dependencies")  # the module needs nothing
    readme = (packed / "README.md").read_text()
    for needed in (
        "ListenersClient",
        "ACCEPTED_VERSIONS",
        '{"type": "ping"}',
        "visibilitychange",
        "4012",
        "*.position",
    ):
        assert needed in readme, needed
    for event_type in EVENT_MODELS:
        assert f"`{event_type}`" in readme, event_type


def test_the_declarations_cover_every_event_and_every_export(packed: Path) -> None:
    events = (packed / "dist" / "events.d.ts").read_text()
    assert set(re.findall(r'^\s+type: "([a-z.]+)";$', events, re.MULTILINE)) == set(EVENT_MODELS)
    assert "export type ContractVersion = 1;" in events
    found = json.loads(run(["node", str(ROOT / "tests" / "js" / "exports.mjs"), str(packed)], ROOT))
    assert found["diagnostics"] == []
    assert found["declared"] == found["exported"]


def test_a_typed_usage_example_compiles_against_the_tarball(packed: Path, tmp_path: Path) -> None:
    """`tsc --noEmit` (strict) on tests/js/usage.ts, in a project that has the tarball as a
    dependency: what resolves is the package's `exports` and `types`, as for its users."""
    project = tmp_path / "app"
    shutil.copytree(packed, project / "node_modules" / "listeners-client")
    for name in ("usage.ts", "tsconfig.json"):
        shutil.copy(ROOT / "tests" / "js" / name, project / name)
    (project / "package.json").write_text(json.dumps({"name": "app", "private": True, "type": "module"}))
    run([str(TSC), "--noEmit", "-p", str(project / "tsconfig.json")], project)
    # and it is not vacuous: a field no event has is an error
    usage = (project / "usage.ts").read_text()
    (project / "usage.ts").write_text(usage.replace("event.payload.status", "event.payload.no_such_field"))
    done = subprocess.run(
        [str(TSC), "--noEmit", "-p", str(project / "tsconfig.json")],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "no_such_field" in done.stdout, done.stdout
