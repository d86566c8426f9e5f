"""Starts and stops a private `redis-server` and the Firestore emulator on free ports.

Each is a child process that this code started and stops by its own pid; the machine's
shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_for_output(
    path: str,
    marker: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    offset: int = 0,
) -> None:
    """Wait until a child's log file contains `marker` past byte `offset`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before saying {marker!r}")
        with open(path, "rb") as output:
            output.seek(offset)
            if marker.encode() in output.read():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not say {marker!r} after {timeout}s")


class _Child:
    """A child process on a fixed port that can be stopped and started again on that port."""

    listen_host = "127.0.0.1"  # where start() waits for it (the fault lab moves it elsewhere)

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir = tempfile.mkdtemp(prefix=f"listeners-{type(self).__name__.lower()}-")

    @property
    def log_path(self) -> str:
        """The child's stdout and stderr, appended across restarts, for post-mortems."""
        return os.path.join(self.workdir, "output.log")

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                self.command(),
                cwd=PROJECT_ROOT,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._ready_or_stopped(lambda: wait_for_port(self.port, timeout, self.process, self.listen_host))

    def _ready_or_stopped(self, wait: Callable[[], None]) -> None:
        """Waits for the child to be ready; if it is not, stops it before raising: a child that
        did not come up in time must not outlive the run that started it."""
        try:
            wait()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.cleanup()

    def cleanup(self) -> None:
        """Remove what the child left on disk; it is not started again after this."""
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisServer(_Child):
    """A throw-away redis-server: no persistence, loopback only, optional password."""

    def __init__(self, port: int | None = None, password: str = "") -> None:
        super().__init__(port)
        self.password = password

    def command(self) -> list[str]:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        command += ["--dir", self.workdir]
        if self.password:
            command += ["--requirepass", self.password]
        return command


GOOGLE_EMULATOR_JAR = Path(
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"
)
GOOGLE = "google"
NPM = "npm"


def google_emulator_jar() -> Path | None:
    """Google's Firestore emulator (Debian package google-cloud-cli-firestore-emulator), if any.

    Found where the package puts it, or under the SDK root that `gcloud` runs from; Java must be
    on the PATH too.
    """
    if shutil.which("java") is None:
        return None
    candidates = [GOOGLE_EMULATOR_JAR]
    gcloud = shutil.which("gcloud")
    if gcloud is not None:
        sdk_root = Path(gcloud).resolve().parent.parent
        candidates.append(sdk_root / "platform" / "cloud-firestore-emulator" / "cloud-firestore-emulator.jar")
    return next((jar for jar in candidates if jar.is_file()), None)


def emulator_kind() -> str:
    """Which Firestore emulator runs: `LISTENERS_FIRESTORE_EMULATOR` (google, npm or auto).

    auto, the default, takes Google's own wherever it is installed and the npm package
    (@firestore-emulator/server) only as the fallback. Asking for google where it is absent is
    an error, never a silent fallback.
    """
    wanted = os.environ.get("LISTENERS_FIRESTORE_EMULATOR", "auto").strip().lower() or "auto"
    if wanted not in {GOOGLE, NPM, "auto"}:
        raise ValueError(f"LISTENERS_FIRESTORE_EMULATOR must be google, npm or auto, not {wanted!r}")
    if wanted == GOOGLE and google_emulator_jar() is None:
        raise RuntimeError(
            "LISTENERS_FIRESTORE_EMULATOR=google but Google's Firestore emulator is not installed "
            "(Debian package google-cloud-cli-firestore-emulator, and java on the PATH)"
        )
    if wanted == "auto":
        return GOOGLE if google_emulator_jar() is not None else NPM
    return wanted


class FirestoreEmulator(_Child):
    """A Firestore emulator on a free port: Google's own where installed, else the npm one.

    Google's answers each Listen target with its own changes, keeps many targets on one stream
    and enforces preconditions as production does; the npm one resends every watched query on
    each write and is only the fallback. `kind` says which (see `emulator_kind`).
    """

    def __init__(self, port: int | None = None, kind: str | None = None) -> None:
        super().__init__(port)
        self.kind = kind or emulator_kind()

    def command(self) -> list[str]:
        if self.kind == GOOGLE:
            jar = google_emulator_jar()
            assert jar is not None, "emulator_kind() checked it"
            # java itself, not Google's wrapper script: the pid we stop is the emulator's.
            return [
                "java",
                "-Duser.language=en",
                "-cp",
                str(jar),
                "com.google.cloud.datastore.emulator.firestore.CloudFirestore",
                "start",
                "--host=127.0.0.1",
                f"--port={self.port}",
            ]
        return ["node", str(PROJECT_ROOT / "tools" / "firestore-emulator.js"), str(self.port)]

    def start(self, timeout: float = 60.0) -> None:
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        super().start(timeout)
        if self.kind == GOOGLE:
            # It accepts connections a moment before it serves; it says so in its output.
            self._ready_or_stopped(
                lambda: wait_for_output(
                    self.log_path, "Dev App Server is now running", timeout, self.process, offset
                )
            )

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def description(self) -> str:
        """One line for test summaries and benchmark reports."""
        return self.describe(self.kind)

    @staticmethod
    def describe(kind: str) -> str:
        if kind == GOOGLE:
            return f"Google's Firestore emulator ({google_emulator_jar()})"
        package = PROJECT_ROOT / "node_modules" / "@firestore-emulator" / "server" / "package.json"
        version = json.loads(package.read_text()).get("version", "?") if package.exists() else "?"
        why = (
            "Google's is not installed"
            if google_emulator_jar() is None
            else "LISTENERS_FIRESTORE_EMULATOR=npm"
        )
        return f"npm @firestore-emulator/server {version} (the fallback: {why})"


def emulator_env(host: str) -> None:
    """Point the Firestore SDK of this process at the emulator."""
    os.environ["FIRESTORE_EMULATOR_HOST"] = host


class ServiceProcess:
    """The service as the container runs it, `uvicorn app.main:app`, as a child process.

    Output goes to `log_path` when given, else to this process's own stdout.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        port: int | None = None,
        log_path: Path | None = None,
        app: str = "app.main:app",
    ) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        output = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed in stop()
        self._output = output
        # Its own session: a Ctrl-C at the terminal reaches the parent, which stops it in order.
        self.process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=dict(env),
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_listening(self, timeout: float = 60.0) -> None:
        wait_for_port(self.port, timeout, self.process)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal it, wait (killing it past `timeout`), and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._output is not None:
            self._output.close()
        return self.process.returncode
