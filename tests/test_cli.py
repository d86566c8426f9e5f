"""The operator CLI (`listeners`): config check, secrets push, smoke test.

The smoke test runs against real servers: redis-server (plain, with AUTH, and with TLS from a
test CA), a stdlib HTTP server for /healthz, and a `websockets` server with the handshake of
/ws for the WebSocket check.
Secret Manager is a fake that parses every request with the library's own request types.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.api_core.exceptions import NotFound, PermissionDenied
from google.cloud import secretmanager

from listeners.cli import config_check, main, parser, secrets_push, smoke
from listeners_testkit.processes import RedisServer, free_port, wait_for_port
from tests.test_config import ADMIN

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "smoke-password-0123456789"
REDIS = {"host": "master.x.cache.amazonaws.com", "port": 6379, "password": PASSWORD, "tls": True, "db": 0}
SERVICE = {
    "allowed_origins": ["https://app.pinnokioagent.com"],
    "alb_ws_path": "/ws",
    "heartbeat_ttl_seconds": 90,
}
TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-token.signature"


# ------------------------------------------------------------------ config check


def test_config_check_summarises_a_valid_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    env = {
        "LISTENERS_REDIS_HOST": "127.0.0.1",
        "LISTENERS_REDIS_PASSWORD": PASSWORD,
        "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8080",
        "FIREBASE_PROJECT_ID": "demo",
    }
    assert config_check(env) == 0
    out = capsys.readouterr().out
    assert out.startswith("configuration ok")
    assert "redis: 127.0.0.1:6379 db=0 tls=off" in out and "password=set" in out
    assert "secret manager: not used" in out and "emulator 127.0.0.1:8080" in out
    assert PASSWORD not in out


def test_config_check_names_every_problem_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_check({"LISTENERS_REDIS_PORT": "0", "LISTENERS_REDIS_PASSWORD": PASSWORD}) == 2
    captured = capsys.readouterr()
    assert "LISTENERS_REDIS_HOST / redis.host: missing" in captured.err
    assert "LISTENERS_REDIS_PORT / redis.port: must be an integer" in captured.err
    assert "FIREBASE_ADMIN_JSON / secret firebase_admin: missing" in captured.err
    assert PASSWORD not in captured.out + captured.err


def test_main_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith(("LISTENERS_", "FIREBASE", "FIRESTORE", "GOOGLE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LISTENERS_REDIS_HOST", "redis.internal")
    monkeypatch.setenv("FIREBASE_ADMIN_JSON", json.dumps(ADMIN))
    assert main(["config", "check"]) == 0
    assert "firestore: project prod-project, service account" in capsys.readouterr().out


# ------------------------------------------------------------------ secrets push


class FakeSecretManager:
    """Secret Manager in memory; every request goes through the client library's own type."""

    def __init__(self) -> None:
        self.secrets: dict[str, list[bytes]] = {}
        self.labels: dict[str, dict[str, str]] = {}

    def get_secret(self, *, request: dict[str, Any]) -> Any:
        name = secretmanager.GetSecretRequest(request).name
        if name not in self.secrets:
            raise NotFound(name)
        return secretmanager.Secret(name=name)

    def create_secret(self, *, request: dict[str, Any]) -> Any:
        parsed = secretmanager.CreateSecretRequest(request)
        assert secretmanager.Replication.pb(parsed.secret.replication).HasField("automatic")
        name = f"{parsed.parent}/secrets/{parsed.secret_id}"
        self.secrets[name] = []
        self.labels[name] = dict(parsed.secret.labels)
        return secretmanager.Secret(name=name)

    def add_secret_version(self, *, request: dict[str, Any]) -> Any:
        parsed = secretmanager.AddSecretVersionRequest(request)
        versions = self.secrets[parsed.parent]
        versions.append(parsed.payload.data)
        return secretmanager.SecretVersion(name=f"{parsed.parent}/versions/{len(versions)}")

    def access_secret_version(self, *, request: dict[str, Any]) -> Any:
        name = secretmanager.AccessSecretVersionRequest(request).name
        versions = self.secrets.get(name.rsplit("/versions/", 1)[0])
        if not versions:
            raise NotFound(name)
        return secretmanager.AccessSecretVersionResponse(name=name, payload={"data": versions[-1]})


def write(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def push(argv: list[str], fake: FakeSecretManager | None = None, env: dict[str, str] | None = None) -> int:
    def no_client() -> FakeSecretManager:
        raise AssertionError("Secret Manager must not be called")

    args = parser().parse_args(["secrets", "push", *argv])
    return secrets_push(args, env or {}, (lambda: fake) if fake else no_client)


def test_push_creates_the_three_secrets_then_adds_versions_only_on_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeSecretManager()
    files = [
        *("--redis", write(tmp_path / "redis.json", REDIS)),
        *("--firebase-admin", write(tmp_path / "admin.json", ADMIN)),
        *("--service-config", write(tmp_path / "service.json", SERVICE)),
    ]
    assert push(["--project", "p1", *files], fake) == 0
    assert set(fake.secrets) == {
        "projects/p1/secrets/pinnokio-listeners-redis",
        "projects/p1/secrets/pinnokio-listeners-firebase_admin",
        "projects/p1/secrets/pinnokio-listeners-service_config",
    }
    assert json.loads(fake.secrets["projects/p1/secrets/pinnokio-listeners-redis"][0]) == REDIS
    assert fake.labels["projects/p1/secrets/pinnokio-listeners-redis"] == {"app": "listeners"}
    out = capsys.readouterr().out
    assert out.count(": created (") == 3
    assert PASSWORD not in out and "PRIVATE KEY" not in out

    assert push(["--project", "p1", *files], fake) == 0
    assert capsys.readouterr().out.count(": unchanged (") == 3
    assert all(len(v) == 1 for v in fake.secrets.values())

    changed = write(tmp_path / "redis.json", {**REDIS, "port": 6380})
    assert push(["--project", "p1", "--redis", changed], fake) == 0
    assert "pinnokio/listeners/redis: updated (projects/p1/secrets/pinnokio-listeners-redis/versions/2)" in (
        capsys.readouterr().out
    )


def test_push_validates_with_the_service_rules_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis = write(tmp_path / "redis.json", {"port": 99999, "tls": "maybe", "password": PASSWORD})
    admin = write(tmp_path / "admin.json", {k: v for k, v in ADMIN.items() if k != "private_key"})
    service = write(tmp_path / "service.json", {**SERVICE, "alb_ws_path": "ws"})
    argv = ["--project", "p1", "--redis", redis, "--firebase-admin", admin, "--service-config", service]
    assert push(argv) == 2  # and Secret Manager was never called
    err = capsys.readouterr().err
    for problem in (
        "LISTENERS_REDIS_HOST / redis.host: missing",
        "LISTENERS_REDIS_PORT / redis.port: must be an integer from 1 to 65535",
        "LISTENERS_REDIS_TLS / redis.tls: must be true or false",
        "secret firebase_admin: missing private_key",
        "alb_ws_path: must start with /",
    ):
        assert problem in err
    assert PASSWORD not in err


def test_push_rejects_unreadable_files_and_needs_a_project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    listed = write(tmp_path / "list.json", ["a"])
    argv = ["--redis", str(tmp_path / "broken.json"), "--service-config", listed, "--aws-secret", "nofile"]
    assert push(argv) == 2
    err = capsys.readouterr().err
    assert "--project or GOOGLE_PROJECT_ID: missing" in err
    assert "broken.json: JSONDecodeError" in err and "list.json: must be a JSON object" in err
    assert "--aws-secret nofile: expected NAME=FILE" in err
    assert push(["--project", "p1"]) == 2
    assert "nothing to push" in capsys.readouterr().err


def test_push_follows_secret_name_overrides_and_the_aws_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeSecretManager()
    env = {"GOOGLE_PROJECT_ID": "p2", "LISTENERS_SERVICE_SECRET": "projects/shared/secrets/listeners-service"}
    argv = [
        *("--service-config", write(tmp_path / "service.json", SERVICE)),
        *("--aws-secret", "pinnokio/aws=" + write(tmp_path / "aws.json", {"role": "x"})),
    ]
    assert push(argv, fake, env) == 0
    assert set(fake.secrets) == {
        "projects/shared/secrets/listeners-service",
        "projects/p2/secrets/pinnokio-aws",
    }


def test_push_reports_api_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Denied(FakeSecretManager):
        def create_secret(self, *, request: dict[str, Any]) -> Any:
            raise PermissionDenied("secretmanager.secrets.create denied")

    assert push(["--project", "p1", "--redis", write(tmp_path / "r.json", REDIS)], Denied()) == 1
    assert "push failed: PermissionDenied: 403 secretmanager.secrets.create denied" in capsys.readouterr().err


def test_push_dry_run_validates_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert push(["--project", "p1", "--dry-run", "--redis", write(tmp_path / "r.json", REDIS)]) == 0
    assert "pinnokio/listeners/redis: valid (dry run, not pushed)" in capsys.readouterr().out


# ------------------------------------------------------------------ smoke: healthz


@contextlib.contextmanager
def http_server(status: int, body: dict[str, Any]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_smoke(argv: list[str], env: dict[str, str] | None = None) -> int:
    # Generous waits: a failure the tests expect is a refusal, which comes at once; an explicit
    # --ws-wait in argv wins over this one.
    return smoke(parser().parse_args(["smoke", "--timeout", "30", "--ws-wait", "30", *argv]), env or {})


@pytest.mark.parametrize(
    ("status", "body", "code", "expected"),
    [
        (
            200,
            {"status": "ok", "version": "0.1.0", "listeners_count": 3, "redis": "ok"},
            0,
            "PASS  healthz   200",
        ),
        (200, {"status": "degraded", "redis": "down"}, 1, "FAIL  healthz   200 but not ok"),
        (503, {"status": "starting"}, 1, "FAIL  healthz   HTTP 503 status=starting"),
    ],
)
def test_smoke_healthz(
    status: int, body: dict[str, Any], code: int, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with http_server(status, body) as url:
        assert run_smoke(["--url", url]) == code
    assert expected in capsys.readouterr().out


def test_smoke_reports_an_unreachable_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_smoke(["--url", f"http://127.0.0.1:{free_port()}"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  healthz" in out and "ConnectError" in out
    assert out.rstrip().endswith("smoke: 1 of 1 checks failed")


def test_smoke_needs_something_to_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_smoke([]) == 2
    assert run_smoke(["--redis", "--token", TOKEN]) == 2
    assert "the WebSocket check needs --url" in capsys.readouterr().err


# ------------------------------------------------------------------ smoke: Redis


def redis_env(port: int, host: str = "127.0.0.1", **extra: str) -> dict[str, str]:
    return {"LISTENERS_REDIS_HOST": host, "LISTENERS_REDIS_PORT": str(port), **extra}


def test_smoke_redis_round_trip(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_smoke(["--redis"], redis_env(redis_server.port)) == 0
    out = capsys.readouterr().out
    assert "PASS  redis" in out and "1 receiver (no TLS, no AUTH)" in out


def test_smoke_redis_reports_configuration_and_connection_problems(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_smoke(["--redis"], {}) == 1
    assert (
        "FAIL  redis     configuration: LISTENERS_REDIS_HOST / redis.host: missing" in capsys.readouterr().out
    )
    assert run_smoke(["--redis"], redis_env(free_port())) == 1
    assert "ConnectionError" in capsys.readouterr().out


def certificates(directory: Path) -> dict[str, Path]:
    """A test CA and a server certificate for DNS:localhost only (no IP address)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "listeners test CA")])
    usage = {
        "digital_signature": False,
        "content_commitment": False,
        "key_encipherment": False,
        "data_encipherment": False,
        "key_agreement": False,
        "encipher_only": False,
        "decipher_only": False,
    }
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


class TlsRedisServer(RedisServer):
    """redis-server with TLS only (no plain port) and AUTH, as ElastiCache runs it."""

    def __init__(self, files: dict[str, Path]) -> None:
        super().__init__(password=PASSWORD)
        self.files = files

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("--port") + 1] = "0"
        return [
            *command,
            *("--tls-port", str(self.port)),
            *("--tls-cert-file", str(self.files["cert"]), "--tls-key-file", str(self.files["key"])),
            *("--tls-ca-cert-file", str(self.files["ca"]), "--tls-auth-clients", "no"),
        ]


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedisServer]:
    with TlsRedisServer(certificates(tmp_path_factory.mktemp("tls"))) as server:
        yield server


def test_smoke_redis_over_tls_with_auth(
    tls_redis: TlsRedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    env = redis_env(
        tls_redis.port,
        "localhost",
        LISTENERS_REDIS_TLS="true",
        LISTENERS_REDIS_CA_FILE=str(tls_redis.files["ca"]),
        LISTENERS_REDIS_PASSWORD=PASSWORD,
    )
    assert run_smoke(["--redis"], env) == 0
    out = capsys.readouterr().out
    assert "PASS  redis     localhost:" in out and "(TLS, certificate verified, AUTH)" in out
    assert PASSWORD not in out


@pytest.mark.parametrize(
    "change",
    [
        {"LISTENERS_REDIS_CA_FILE": ""},  # the system store does not know the test CA
        {"LISTENERS_REDIS_HOST": "127.0.0.1"},  # the certificate names localhost only
    ],
)
def test_smoke_redis_verifies_the_certificate_and_host_name(
    tls_redis: TlsRedisServer, change: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    env = redis_env(
        tls_redis.port,
        "localhost",
        LISTENERS_REDIS_TLS="true",
        LISTENERS_REDIS_CA_FILE=str(tls_redis.files["ca"]),
        LISTENERS_REDIS_PASSWORD=PASSWORD,
    )
    assert run_smoke(["--redis"], {**env, **change}) == 1
    assert "FAIL  redis" in (out := capsys.readouterr().out) and "TLS verification failed" in out


def test_smoke_redis_with_a_wrong_password(
    tls_redis: TlsRedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    env = redis_env(
        tls_redis.port,
        "localhost",
        LISTENERS_REDIS_TLS="true",
        LISTENERS_REDIS_CA_FILE=str(tls_redis.files["ca"]),
        LISTENERS_REDIS_PASSWORD="not-the-password-at-all",
    )
    assert run_smoke(["--redis"], env) == 1
    out = capsys.readouterr().out
    assert "FAIL  redis" in out and "not-the-password-at-all" not in out


# ------------------------------------------------------------------ smoke: WebSocket

# A stand-in for /ws with the service's handshake (docs/websocket.md): the Origin is checked
# before the upgrade (HTTP 403), the token after it (close 4001-4010), then `auth.ok`. The real
# endpoint is smoke-tested in tests/test_deploy.py, against the service built as the image is.
WS_SERVER = """
import asyncio, http, json, sys
from urllib.parse import parse_qs, urlsplit
from websockets.asyncio.server import serve

PORT, TOKEN = int(sys.argv[1]), sys.argv[2]

def process_request(connection, request):
    url = urlsplit(request.path)
    if url.path == "/healthz":
        body = {"status": "ok", "version": "ws-test", "listeners_count": 0, "redis": "ok"}
        return connection.respond(http.HTTPStatus.OK, json.dumps(body))
    if url.path not in ("/ws", "/silent"):
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\\n")
    if request.headers.get("Origin") not in (None, "https://app.example.com"):
        return connection.respond(http.HTTPStatus.FORBIDDEN, "origin\\n")
    return None

def select_subprotocol(connection, subprotocols):
    return "bearer" if subprotocols and subprotocols[0] == "bearer" else None

async def handler(websocket):
    url = urlsplit(websocket.request.path)
    if url.path == "/silent":
        await websocket.wait_closed()
        return
    offered = [p.strip() for p in websocket.request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    token = parse_qs(url.query).get("token", [""])[0]
    if offered[0] == "bearer" and len(offered) == 2:
        token = offered[1]
    if token != TOKEN:
        await websocket.close(4005, "bad signature")
        return
    await websocket.send(json.dumps({"type": "auth.ok", "uid": "u1", "expires_at": 0}))
    await websocket.wait_closed()

async def main():
    async with serve(handler, "127.0.0.1", PORT, process_request=process_request,
                     select_subprotocol=select_subprotocol):
        await asyncio.Future()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def ws_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", WS_SERVER, str(port), TOKEN])
    try:
        wait_for_port(port, 60, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            ["--token-in", "query"],
            "PASS  websocket ws://127.0.0.1:{port}/ws?token=***: auth.ok for uid 'u1'\n",
        ),
        (
            ["--token-in", "protocol", "--origin", "https://app.example.com"],
            "auth.ok for uid 'u1', subprotocol bearer",
        ),
    ],
)
def test_smoke_websocket_with_the_token(
    ws_server: str, options: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_smoke(["--url", ws_server, "--token", TOKEN, *options]) == 0
    out = capsys.readouterr().out
    assert expected.format(port=ws_server.rsplit(":", 1)[1]) in out and "PASS  healthz" in out
    assert TOKEN not in out


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--token", "wrong-token"], "token refused: closed with 4005 bad signature"),
        (["--token", TOKEN, "--origin", "https://evil.example"], "HTTP 403: the Origin was refused"),
        (["--token", TOKEN, "--ws-path", "/socket"], "HTTP 404: no WebSocket endpoint at this path"),
        (
            ["--token", TOKEN, "--ws-path", "/silent", "--ws-wait", "0.3"],
            "connected, but no auth.ok within 0.3 s",
        ),
    ],
)
def test_smoke_websocket_reports_refusals(
    ws_server: str, options: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_smoke(["--url", ws_server, *options]) == 1
    out = capsys.readouterr().out
    assert "FAIL  websocket" in out and expected in out


def test_smoke_websocket_token_from_the_environment(
    ws_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_smoke(["--url", ws_server], {"LISTENERS_SMOKE_TOKEN": TOKEN}) == 0
    assert "PASS  websocket" in capsys.readouterr().out
