"""The configuration's table: every key declared once, and from it the settings, `config check`
and docs/configuration.md; the WebSocket protocol's keys read through it; one Secret Manager
set-up for both loaders."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from listeners import cli, config
from listeners.config import ConfigError, Key, Secret, Settings, load_redis_settings, load_settings
from listeners_bridge import secret_manager
from listeners_bridge.settings import existing_file, key
from tests.test_config import ADMIN

ROOT = Path(__file__).resolve().parents[1]
BASE = {"LISTENERS_REDIS_HOST": "h", "FIRESTORE_EMULATOR_HOST": "e:1", "FIREBASE_PROJECT_ID": "p"}


@dataclass(frozen=True)
class Extended(Settings):
    """With two keys more"""

    widgets: int = key("LISTENERS_WIDGETS", 7, "widgets per user", span=(1, 9))
    colour: str = key("LISTENERS_WIDGET_COLOUR", "blue", "their colour", "service_config.colour")


def test_the_doc_is_current() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == cli.with_doc_table(doc, config.table()), "run: listeners config doc"


def test_a_key_added_to_the_table_is_read_checked_and_documented(capsys: pytest.CaptureFixture[str]) -> None:
    settings, _ = config.load({**BASE, "LISTENERS_WIDGETS": "3"}, root=Extended)
    assert isinstance(settings, Extended) and (settings.widgets, settings.colour) == (3, "blue")
    with pytest.raises(ConfigError) as caught:
        config.load({**BASE, "LISTENERS_WIDGETS": "10"}, root=Extended)
    assert caught.value.problems == ["LISTENERS_WIDGETS: must be an integer from 1 to 9"]
    # Its secret key wins over its variable, as every other key's.
    secrets = {config.SERVICE_SECRET: json.dumps({"colour": "red"}), config.REDIS_SECRET: "{}"}
    env = {**BASE, "GOOGLE_PROJECT_ID": "g", "AWS_REGION_NAME": "r", "LISTENERS_WIDGET_COLOUR": "green"}
    assert config.load(env, secrets.get, root=Extended)[0].colour == "red"  # type: ignore[attr-defined]

    assert cli.config_check({**BASE, "LISTENERS_WIDGETS": "3"}, root=Extended) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["LISTENERS_WIDGETS", "3", "(environment)"] in lines
    assert ["LISTENERS_WIDGET_COLOUR", "'blue'", "(default)"] in lines

    doc = cli.doc_table(config.table(Extended))
    assert "| `LISTENERS_WIDGETS` | — | 7 | 1\N{EN DASH}9 | widgets per user |" in doc
    assert "| `LISTENERS_WIDGET_COLOUR` | `pinnokio/listeners/service_config` (`colour`) | `blue` |" in doc


def test_config_check_lists_every_key_and_no_secret_value(capsys: pytest.CaptureFixture[str]) -> None:
    env = {**BASE, "LISTENERS_REDIS_PASSWORD": "hunter2-password", "LISTENERS_ADMIN_TOKEN": "t" * 20}
    assert cli.config_check(env) == 0
    out = capsys.readouterr().out
    listed = out.split("every key (value, where it came from):\n")[1].splitlines()
    assert [line.split()[0] for line in listed] == [k.env for k in config.table()]
    assert "hunter2" not in out and "t" * 20 not in out
    assert ["LISTENERS_ADMIN_TOKEN", "set", "(environment)"] in [line.split() for line in out.splitlines()]


def valid(k: Key, tmp_path: Path, n: int) -> Any:
    """A valid value for key `k`, different for each `n`, as a secret's JSON holds it."""
    if k.check is existing_file:
        (tmp_path / str(n)).write_text("")
        return str(tmp_path / str(n))
    if k.check is config.absolute_path:
        return f"/path{n}"
    if k.check is config.invalid_cidrs:
        return [f"10.{n}.0.0/16"]
    if k.kind in ("integer", "number"):
        assert k.span is not None
        return int(k.span[0]) + n
    return {"boolean": n == 1, "list": [f"o{n}"], "secret": f"secret-value-{n:020d}"}.get(k.kind, f"v{n}")


def test_for_every_key_of_a_secret_the_secret_wins_then_the_environment(tmp_path: Path) -> None:
    in_secrets = [k for k in config.table() if "." in k.secret]
    assert len(in_secrets) > 15
    secrets: dict[str, dict[str, Any]] = {config.REDIS_SECRET: {}, config.SERVICE_SECRET: {}}
    env = {**BASE, "GOOGLE_PROJECT_ID": "g", "AWS_REGION_NAME": "r", "FIREBASE_DATABASE_EMULATOR_HOST": "d:1"}
    for k in in_secrets:
        name = {"redis": config.REDIS_SECRET, "service_config": config.SERVICE_SECRET}[k.secret.split(".")[0]]
        secrets[name][k.secret.split(".")[1]] = valid(k, tmp_path, 1)
        from_env = valid(k, tmp_path, 2)
        env[k.env] = ",".join(from_env) if isinstance(from_env, list) else str(from_env).lower()
    _, values = config.load(env, lambda name: json.dumps(secrets[name]) if name in secrets else None)
    for k in in_secrets:
        assert values[k.env].source.startswith("secret pinnokio/listeners/"), k.env
    _, values = config.load(env, lambda name: "{}" if name == config.REDIS_SECRET else None)
    for k in in_secrets:
        assert values[k.env].source == "environment", k.env
    _, values = config.load({**BASE, "LISTENERS_REDIS_HOST": "h"})
    assert all(values[k.env].source == "default" for k in in_secrets if k.env != "LISTENERS_REDIS_HOST")


def test_every_number_has_a_range_and_every_label_names_its_secret_key() -> None:
    for k in config.table():
        assert k.span or k.kind not in ("integer", "number"), k.env
        assert k.label == (f"{k.env} / {k.secret}" if "." in k.secret else k.label), k.env
    assert len({k.env for k in config.table()}) == len(config.table())  # each variable once


def test_the_websocket_protocol_reads_its_keys_through_the_table_and_not_at_import() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "LISTENERS_WS_DEFLATE": "zstd", "LISTENERS_WS_CLOSE_TIMEOUT_SECONDS": "0"})
    assert caught.value.problems == [
        "LISTENERS_WS_DEFLATE: must be no-context, context or off",
        "LISTENERS_WS_CLOSE_TIMEOUT_SECONDS: must be a number from 0.1 to 3600",
    ]
    assert load_settings({**BASE, "LISTENERS_WS_DEFLATE": "Context"}).websocket.deflate == "context"
    source = (ROOT / "src" / "listeners" / "deliver" / "wsprotocol.py").read_text()
    assert "environ" not in source
    imported = subprocess.run(
        [sys.executable, "-c", "import listeners.deliver.wsprotocol"],
        env={"LISTENERS_WS_DEFLATE": "zstd", "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr  # a bad value is for load_settings to name


def test_one_secret_manager_set_up_fails_both_loaders_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(project: str, service_account_secret: str = "", credentials_json: str = "") -> Any:
        raise PermissionError("no credentials for project g")

    monkeypatch.setattr(secret_manager, "secret_reader", unreachable)
    env = {**BASE, "GOOGLE_PROJECT_ID": "g", "GOOGLE_APPLICATION_CREDENTIALS_JSON": "{}"}
    expected = ["Google Secret Manager: cannot connect (PermissionError: no credentials for project g)"]
    for loader in (load_settings, load_redis_settings):
        with pytest.raises(ConfigError) as caught:
            loader(env)
        assert caught.value.problems == expected


def test_the_secret_manager_module_does_not_import_the_configuration() -> None:
    code = "import sys, listeners_bridge.secret_manager; assert 'listeners.config' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_load_redis_settings_reads_only_the_redis_secret() -> None:
    read: list[str] = []

    def reader(name: str) -> str | None:
        read.append(name)
        return json.dumps({"host": "from-secret", "control_token": "c" * 16})

    env = {"GOOGLE_PROJECT_ID": "g", "LISTENERS_REDIS_SECRET": "pinnokio/listeners/redis_backend"}
    redis = load_redis_settings(env, reader)
    assert (redis.host, redis.control_token) == ("from-secret", Secret("c" * 16))
    assert read == ["pinnokio/listeners/redis_backend"]


def test_the_firebase_admin_secret_is_read_whole() -> None:
    secrets = {config.REDIS_SECRET: json.dumps({"host": "h"}), config.FIREBASE_SECRET: json.dumps(ADMIN)}
    settings, values = config.load({"GOOGLE_PROJECT_ID": "g", "AWS_REGION_NAME": "r"}, secrets.get)
    assert settings.firebase.project_id == "prod-project"
    assert settings.firebase.admin_json == Secret(json.dumps(ADMIN))
    assert values["FIREBASE_ADMIN_JSON"].source == f"secret {config.FIREBASE_SECRET}"
