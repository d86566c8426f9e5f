"""TLS to Redis is verified: a real redis-server with TLS, a CA of our own."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from listeners.config import RedisSettings, Secret
from listeners_bridge.broker import BrokerUnavailable
from listeners_bridge.redis import RedisBroker
from listeners_testkit.processes import free_port, wait_for_port

pytestmark = pytest.mark.asyncio


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write(path: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _authority(directory: Path, name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    _write(directory / name, key, cert)
    return key, cert


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca = _authority(directory, "ca")
    _authority(directory, "other-ca")
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    names = x509.SubjectAlternativeName([x509.DNSName("localhost")])  # not valid for "127.0.0.1"
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1)).add_extension(names, critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    _write(directory / "server", key, cert)
    port = free_port()
    command = [shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port)]
    command += ["--bind", "127.0.0.1", "--tls-auth-clients", "no", "--requirepass", "tls-pass-0123"]
    command += [
        "--tls-cert-file",
        str(directory / "server.crt"),
        "--tls-key-file",
        str(directory / "server.key"),
    ]
    command += ["--tls-ca-cert-file", str(directory / "ca.crt"), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [*command, "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, 20, None)
        yield port, directory
    finally:
        process.terminate()
        process.wait(10)


def settings(port: int, ca: Path, host: str = "localhost") -> RedisSettings:
    return RedisSettings(host=host, port=port, password=Secret("tls-pass-0123"), tls=True, ca_file=str(ca))


async def test_tls_with_the_right_authority(tls_redis: tuple[int, Path]) -> None:
    port, directory = tls_redis
    broker = RedisBroker(settings(port, directory / "ca.crt"))
    await broker.ping()
    await broker.publish_many([("user:tls", b"{}")])
    await broker.disconnect()


async def test_tls_refuses_an_unknown_authority_and_a_wrong_host(tls_redis: tuple[int, Path]) -> None:
    port, directory = tls_redis
    for wrong in (
        settings(port, directory / "other-ca.crt"),
        settings(port, directory / "ca.crt", host="127.0.0.1"),
    ):
        broker = RedisBroker(wrong)
        with pytest.raises(BrokerUnavailable, match=r"(?i)certificate verify failed"):
            await broker.ping()
        await broker.disconnect()
