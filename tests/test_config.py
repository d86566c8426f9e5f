"""Configuration: precedence, validation that names every problem, secrets never shown."""

from __future__ import annotations

import json

import pytest

from listeners.config import ConfigError, Secret, load_settings
from listeners_bridge.secret_manager import secret_path

PRIVATE_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
    "-----END PRIVATE KEY-----\n"
)
ADMIN = {
    "type": "service_account",
    "project_id": "prod-project",
    "private_key_id": "abc",
    "private_key": PRIVATE_KEY,
    "client_email": "svc@prod-project.iam.gserviceaccount.com",
    "token_uri": "https://oauth2.googleapis.com/token",
}


def test_environment_only_when_no_google_project() -> None:
    env = {
        "LISTENERS_REDIS_HOST": "redis.local",
        "LISTENERS_REDIS_PORT": "6380",
        "LISTENERS_REDIS_PASSWORD": "s3cret-password",
        "LISTENERS_REDIS_TLS": "true",
        "LISTENERS_REDIS_DB": "2",
        "LISTENERS_CHANNEL_PREFIX": "u:",
        "FIREBASE_ADMIN_JSON": json.dumps(ADMIN),
        "ALB_WS_URL": "wss://listeners.example.com/ws",
    }

    def never(name: str) -> str | None:
        raise AssertionError("Secret Manager must not be called without GOOGLE_PROJECT_ID")

    s = load_settings(env, read_secret=never)
    assert (s.redis.host, s.redis.port, s.redis.tls, s.redis.db, s.redis.channel_prefix) == (
        "redis.local",
        6380,
        True,
        2,
        "u:",
    )
    assert s.redis.password == Secret("s3cret-password")
    assert s.firebase.project_id == "prod-project"
    assert s.service.ws_url == "wss://listeners.example.com/ws"
    assert "s3cret" not in repr(s) and "PRIVATE KEY" not in repr(s)


def test_secret_manager_wins_over_environment() -> None:
    secrets = {
        "pinnokio/listeners/redis": json.dumps(
            {
                "host": "from-secret",
                "port": 6379,
                "password": "pw-from-secret",
                "tls": True,
                "db": 0,
                "channel_prefix": "user:",
            }
        ),
        "pinnokio/listeners/firebase_admin": json.dumps(ADMIN),
        "pinnokio/listeners/service_config": json.dumps(
            {
                "allowed_origins": ["https://app.pinnokioagent.com"],
                "alb_ws_path": "/ws",
                "heartbeat_ttl_seconds": 60,
            }
        ),
    }
    env = {
        "GOOGLE_PROJECT_ID": "gcp",
        "AWS_REGION_NAME": "us-east-1",
        "LISTENERS_REDIS_HOST": "from-env",
        "LISTENERS_REDIS_DB": "3",
    }
    s = load_settings(env, read_secret=secrets.get)
    assert s.redis.host == "from-secret"  # the secret wins
    assert s.redis.db == 0
    assert s.service.allowed_origins == ("https://app.pinnokioagent.com",)
    assert s.service.heartbeat_ttl_seconds == 60
    # a key absent from the secret falls back to the environment
    del secrets["pinnokio/listeners/service_config"]
    env["LISTENERS_HEARTBEAT_TTL_SECONDS"] = "45"
    assert load_settings(env, read_secret=secrets.get).service.heartbeat_ttl_seconds == 45


def test_every_problem_is_named_at_once_without_values() -> None:
    env = {
        "GOOGLE_PROJECT_ID": "gcp",
        "LISTENERS_REDIS_PORT": "not-a-port",
        "LISTENERS_REDIS_TLS": "maybe",
        "LISTENERS_REDIS_PASSWORD": "hunter2-password",
        "LOG_LEVEL": "chatty",
        "AWS_SECRET_NAME": "aws/params",
    }
    secrets = {"pinnokio/listeners/firebase_admin": json.dumps({**ADMIN, "private_key": ""})}
    with pytest.raises(ConfigError) as caught:
        load_settings(env, read_secret=secrets.get)
    message = str(caught.value)
    for expected in (
        "AWS_REGION_NAME: missing",
        "secret pinnokio/listeners/redis: not found",
        "secret aws/params: not found",
        "LISTENERS_REDIS_HOST / redis.host: missing",
        "LISTENERS_REDIS_PORT / redis.port: must be an integer",
        "LISTENERS_REDIS_TLS / redis.tls: must be true or false",
        "secret firebase_admin: missing private_key",
        "LOG_LEVEL",
    ):
        assert expected in message, expected
    assert "hunter2" not in message


def test_broken_secret_json_and_reader_errors() -> None:
    def reader(name: str) -> str | None:
        if name.endswith("redis"):
            return "{not json"
        if name.endswith("firebase_admin"):
            raise PermissionError("403 on secret pinnokio/listeners/firebase_admin")
        return None

    with pytest.raises(ConfigError) as caught:
        load_settings({"GOOGLE_PROJECT_ID": "p", "AWS_REGION_NAME": "r"}, read_secret=reader)
    assert "secret pinnokio/listeners/redis: is not valid JSON" in caught.value.problems
    assert any("cannot be read (PermissionError" in p for p in caught.value.problems)


def test_emulator_needs_no_credentials() -> None:
    s = load_settings(
        {
            "LISTENERS_REDIS_HOST": "h",
            "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8080",
            "FIREBASE_PROJECT_ID": "demo",
        }
    )
    assert s.firebase.admin_json is None and s.firebase.project_id == "demo"
    with pytest.raises(ConfigError, match="FIREBASE_PROJECT_ID: missing"):
        load_settings({"LISTENERS_REDIS_HOST": "h", "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8080"})
    with pytest.raises(ConfigError, match="FIREBASE_ADMIN_JSON / secret firebase_admin: missing"):
        load_settings({"LISTENERS_REDIS_HOST": "h"})


def test_stream_limit_cannot_exceed_firestore_limit() -> None:
    base = {"LISTENERS_REDIS_HOST": "h", "FIRESTORE_EMULATOR_HOST": "e:1", "FIREBASE_PROJECT_ID": "p"}
    assert load_settings(base).max_streams_per_connection == 100
    with pytest.raises(ConfigError, match="LISTENERS_MAX_STREAMS_PER_CONNECTION"):
        load_settings({**base, "LISTENERS_MAX_STREAMS_PER_CONNECTION": "101"})


def test_secret_names_map_to_secret_manager_ids() -> None:
    assert secret_path("gcp", "pinnokio/listeners/redis") == (
        "projects/gcp/secrets/pinnokio-listeners-redis/versions/latest"
    )
    full = "projects/x/secrets/y/versions/3"
    assert secret_path("gcp", full) == full


def test_token_certificates_come_over_https_or_from_loopback() -> None:
    base = {"LISTENERS_REDIS_HOST": "h", "FIRESTORE_EMULATOR_HOST": "e:1", "FIREBASE_PROJECT_ID": "p"}
    assert load_settings(base).websocket.certs_url.startswith("https://www.googleapis.com/")
    for url in (
        "https://certs.example.com/x",
        "http://127.0.0.1:9099/certs",
        "http://localhost/c",
        "http://[::1]/c",
    ):
        assert load_settings({**base, "LISTENERS_TOKEN_CERTS_URL": url}).websocket.certs_url == url
    for url in ("http://certs.example.com/x", "http://127.0.0.1.example.com/c", "ftp://127.0.0.1/c", "certs"):
        with pytest.raises(ConfigError) as caught:
            load_settings({**base, "LISTENERS_TOKEN_CERTS_URL": url})
        assert caught.value.problems == [
            "LISTENERS_TOKEN_CERTS_URL: must be https:// (http:// only on loopback:"
            " 127.0.0.0/8, ::1, localhost)"
        ]
