"""The image itself: built from the Dockerfile as it is, and started as ECS starts it.

`scripts/image` builds it with podman (`--isolation=chroot`: the RUN steps need no container
runtime) on `python:3.11-slim`, or, where Docker Hub cannot be reached, on a local stand-in of
it made from Debian bookworm. No container runtime works on the development machines (crun
refuses their hybrid cgroups, runc and crun are denied setrlimit), so the container is made
here as a runtime would make it:

- the image's filesystem, mounted by `podman image mount`: read-only, as the task definition's
  `readonlyRootFilesystem` makes it, with a fresh tmpfs on /tmp for the task's `tmp` volume,
  and /proc, /sys (read-only), a minimal /dev and the host's /etc/resolv.conf and /etc/hosts;
- in mount and PID namespaces of its own: the CMD is PID 1, and every mount above goes away
  with the namespace when PID 1 ends;
- the image's CMD, ENV, WORKDIR and USER as `podman image inspect` gives them, started by
  `chroot --userspec`, with HOME from the image's /etc/passwd as Docker sets it;
- on the host's network, where 127.0.0.1 reaches the test's redis-server, Firestore emulator
  and token issuer. So that it never collides with whatever else this machine runs, port 8080
  becomes a free port, in the CMD and in the HEALTHCHECK: the one change to the image's own
  commands;
- with the task definition's environment (two workers, UVICORN_WS, the shutdown budget...),
  the test's Redis and emulator standing in for ElastiCache and Google, and no Secret Manager.

`Container.exec` is `docker exec`: nsenter into those namespaces and that root, as the USER.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import FirestoreEmulator, RedisServer, free_port
from tests.test_deploy import ROOT, service_container, task_definition

pytestmark = [
    pytest.mark.skipif(
        shutil.which("podman") is None,
        reason="podman is not installed (scripts/bootstrap installs it from Debian's packages)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting the image and chroot into it need root"),
    # The first build on a machine makes the base stand-in and downloads every wheel: minutes.
    pytest.mark.timeout(1800),
]

# What the Dockerfile's layers may add to their base, uncompressed (docs/deploy.md, "The image":
# 104.1 MB measured, nearly all of it the venv).
ADDED_BUDGET_BYTES = 120_000_000

BASE = "python:3.11-slim"
SITE_PACKAGES = "opt/venv/lib/python3.11/site-packages"


def podman(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class Image:
    id: str
    config: dict[str, Any]  # Cmd, Env, User, WorkingDir, as `podman image inspect` gives them
    healthcheck: dict[str, Any]  # Test, StartPeriod, Timeout... (nanoseconds)
    size: int
    base_size: int

    @property
    def user(self) -> tuple[int, int]:
        uid, _, gid = str(self.config["User"]).partition(":")
        return int(uid), int(gid or uid)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The Dockerfile, built as it is by scripts/image. Its id, never its tag: the tag is the
    machine's, and another build may move it meanwhile."""
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    result = subprocess.run(
        ["bash", "scripts/image", "--iidfile", str(iidfile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-20_000:]
    image_id = iidfile.read_text().strip()
    (inspected,) = json.loads(podman("image", "inspect", image_id))
    (base,) = json.loads(podman("image", "inspect", BASE))
    return Image(image_id, inspected["Config"], inspected["Healthcheck"], inspected["Size"], base["Size"])


def mounts_below(root: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [point for point in points if point.startswith(f"{root}/")]


@pytest.fixture(scope="module")
def rootfs(image: Image) -> Iterator[Path]:
    """The image's filesystem, read-only (podman mounts images so)."""
    root = Path(podman("image", "mount", image.id).strip())
    try:
        yield root
    finally:
        # The container's mounts lived in its own mount namespace: none may be left on the host.
        left = mounts_below(root)
        podman("image", "unmount", image.id)
        assert left == [], left


def image_files(root: Path) -> dict[str, os.stat_result]:
    """Every path in the image (files, directories, links), relative to its root, except /proc,
    /sys and /dev, which the runtime provides."""
    found: dict[str, os.stat_result] = {}
    for directory, dirs, files in os.walk(root):
        relative = os.path.relpath(directory, root)
        if relative == ".":
            dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
        for name in [*dirs, *files]:
            path = os.path.normpath(os.path.join(relative, name))
            found[path] = os.lstat(os.path.join(directory, name))
    return found


@pytest.fixture(scope="module")
def listing(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, os.stat_result]:
    files = image_files(rootfs)
    # Kept next to the test's other files, to read when an assertion below fails.
    (tmp_path_factory.mktemp("listing") / "image-files.txt").write_text("\n".join(sorted(files)) + "\n")
    return files


@pytest.fixture(scope="module")
def base_listing(image: Image) -> Iterator[set[str]]:
    """The paths of the base image the final stage started from."""
    root = Path(podman("image", "mount", BASE).strip())
    try:
        yield set(image_files(root))
    finally:
        podman("image", "unmount", BASE)


# ------------------------------------------------------------------ what the image holds


def test_the_image_holds_the_app_and_the_project(listing: dict[str, os.stat_result]) -> None:
    """What runs: `COPY app ./app` under WORKDIR /app, and every module of the project's wheel."""
    for source in (ROOT / "app").rglob("*.py"):
        assert f"app/{source.relative_to(ROOT)}" in listing, source
    for source in (ROOT / "src" / "listeners").rglob("*.py"):
        assert f"{SITE_PACKAGES}/{source.relative_to(ROOT / 'src')}" in listing, source
    assert f"{SITE_PACKAGES}/listeners/deliver/static/listeners-client.js" in listing


# What useradd and groupadd write besides the files they change (their backups).
ACCOUNTS = {"etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-"}


def test_the_final_stage_adds_only_the_venv_the_app_and_the_user(
    listing: dict[str, os.stat_result], base_listing: set[str]
) -> None:
    """Nothing else of the build reaches the image: no build file, no cache, no leftover of the
    build machine (a bind mount's mount point, say). What goes is pip, setuptools and wheel."""
    added = set(listing) - base_listing
    assert f"{SITE_PACKAGES}/listeners/service.py" in added and "app/app/main.py" in added
    ours = ("opt/venv/", "app/")
    bytecode = [p for p in added if p.startswith("usr/") and "/__pycache__" in p]  # pip, as it ran
    unexpected = added - ACCOUNTS - set(bytecode) - {"opt", "opt/venv", "app"}
    assert [p for p in unexpected if not p.startswith(ours)] == []
    removed = base_listing - set(listing)
    packaging = re.compile(
        r".*/(site|dist)-packages/((pip|setuptools|wheel|pkg_resources|_distutils_hack)([-/].*)?"
        r"|distutils-precedence\.pth)|.*/bin/(pip[0-9.]*|wheel)"
    )
    assert removed and [p for p in removed if not packaging.fullmatch(p)] == []


def distributions(listing: dict[str, os.stat_result]) -> set[str]:
    names = set()
    for path in listing:
        match = re.search(r"/(?:site|dist)-packages/([^/]+?)-[^/-]+\.dist-info$", path)
        if match:
            names.add(match.group(1).lower().replace("_", "-"))
    return names


COMPILER = re.compile(
    r"(?:[a-z0-9_]+-linux-gnu-)?(?:cc|gcc|g\+\+|c\+\+|cpp|clang|clang\+\+|ld|ld\.bfd|ld\.gold|as|make|rustc|cargo)(?:-[0-9.]+)?"
)
BIN_DIRECTORIES = {"bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "usr/local/sbin", "opt/venv/bin"}


def test_the_image_holds_no_pip_no_compiler_and_no_test_tools(listing: dict[str, os.stat_result]) -> None:
    installed = distributions(listing)
    assert {"uvicorn", "listeners"} <= installed  # the check sees what pip installed
    assert not installed & {"pip", "setuptools", "wheel"}, installed
    packages = [p for p in listing if re.search(r"/(?:site|dist)-packages/[^/]+$", p)]
    assert not [p for p in packages if p.rsplit("/", 1)[1] in ("pip", "setuptools", "wheel")]
    commands = [p for p in listing if os.path.dirname(p) in BIN_DIRECTORIES]
    assert not [p for p in commands if re.fullmatch(r"pip[0-9.]*|easy_install.*|wheel", os.path.basename(p))]
    assert not [p for p in commands if COMPILER.fullmatch(os.path.basename(p))]
    assert not [p for p in listing if p.startswith(("usr/lib/gcc/", "usr/libexec/gcc/"))]
    assert not installed & {"pytest", "hypothesis", "pytest-asyncio", "mypy", "ruff"}, installed


def test_the_image_holds_no_test_kit(listing: dict[str, os.stat_result]) -> None:
    kit = [p for p in listing if re.search(r"(^|/)listeners/local(/|$)|listeners_testkit", p)]
    assert kit == []
    # and the check can see the kit's place: the service's package is there
    assert any(p.endswith("site-packages/listeners/service.py") for p in listing)


def test_the_image_holds_nothing_from_tests_bench_or_docs(
    rootfs: Path, listing: dict[str, os.stat_result]
) -> None:
    """No file of tests/, bench/ or docs/, wherever it would have been copied: a path of the
    image that ends with one of theirs, with the same bytes (empty files say nothing)."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "tests", "bench", "docs"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    ours = {path: (ROOT / path).read_bytes() for path in tracked.split("\0") if path}
    ours = {path: content for path, content in ours.items() if content}
    assert len(ours) > 50  # the check has something to find
    found = []
    for path, info in listing.items():
        parts = path.split("/")
        for i, part in enumerate(parts):
            tail = "/".join(parts[i:])
            same_size = tail in ours and info.st_size == len(ours[tail])
            if (
                part in ("tests", "bench", "docs")
                and same_size
                and (rootfs / path).read_bytes() == ours[tail]
            ):
                found.append(path)
    assert found == []


def test_only_the_shared_temporary_directories_are_writable_by_anyone(
    image: Image, listing: dict[str, os.stat_result]
) -> None:
    """Nothing in the image belongs to its user, and what anyone may write are Debian's sticky
    temporary directories (/tmp, /var/tmp, /run/lock): the task's readonlyRootFilesystem closes
    them all but /tmp, where it mounts the `tmp` volume (checked running, below)."""
    uid, gid = image.user
    assert not [p for p, s in listing.items() if s.st_uid == uid or s.st_gid == gid]
    writable = {p: s.st_mode for p, s in listing.items() if s.st_mode & 0o002 and not stat.S_ISLNK(s.st_mode)}
    assert "tmp" in writable
    assert [p for p, mode in writable.items() if not (stat.S_ISDIR(mode) and mode & stat.S_ISVTX)] == []
    container = service_container(task_definition())
    assert container["readonlyRootFilesystem"] is True
    assert {"sourceVolume": "tmp", "containerPath": "/tmp", "readOnly": False} in container["mountPoints"]


def test_the_image_fits_its_size_budget(image: Image) -> None:
    added = image.size - image.base_size
    assert added <= ADDED_BUDGET_BYTES, f"{added / 1e6:.1f} MB over the base (docs/deploy.md)"


# ------------------------------------------------------------------ the image running

# Runs in the container's new mount and PID namespaces, as its PID 1 until the last exec: the
# filesystems a container runtime gives a container, over the read-only image, then the
# image's command as its USER, in its WORKDIR, with exactly the environment given.
LAUNCH = r"""
set -eu
root=$1 user=$2 workdir=$3
shift 3
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o nosuid,noexec,mode=755 dev "$root/dev"
for node in null zero full random urandom tty; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/shm"
mount -t tmpfs -o nosuid,nodev,noexec,mode=1777 shm "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmp "$root/tmp"
for file in /etc/resolv.conf /etc/hosts; do
    if [ -f "$root$file" ]; then mount --bind "$file" "$root$file"; fi
done
exec chroot --userspec="$user" "$root" /usr/bin/env -i -C "$workdir" "$@"
"""


@dataclass
class Container:
    launcher: subprocess.Popen[bytes]  # unshare: PID 1's parent on the host, it waits for it
    pid: int  # the container's PID 1, as the host numbers it
    port: int
    env: dict[str, str]
    user: tuple[int, int]
    log: Path
    first_200_after: float  # seconds from the start to the first 200 of /healthz

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`docker exec`: in the container's namespaces and root, as its user, with its env."""
        uid, gid = self.user
        return subprocess.run(
            [
                *("nsenter", f"--target={self.pid}", "--mount", "--pid", "--root", "--wd"),
                *(f"--setuid={uid}", f"--setgid={gid}", "--", "/usr/bin/env", "-i"),
                *(f"{k}={v}" for k, v in self.env.items()),
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def processes(self) -> list[psutil.Process]:
        first = psutil.Process(self.pid)
        return [first, *first.children(recursive=True)]


def ns_pid(process: psutil.Process) -> int:
    """The process's pid in its own PID namespace (the last of NSpid)."""
    found = re.search(r"^NSpid:\s*(.*)$", Path(f"/proc/{process.pid}/status").read_text(), re.M)
    assert found is not None
    return int(found.group(1).split()[-1])


def docker_home(root: Path, uid: int) -> str:
    """HOME as Docker sets it for a USER: its /etc/passwd entry's, which may not exist."""
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 5 and fields[2] == str(uid):
            return fields[5]
    return "/"


@pytest.fixture(scope="module")
def issuer() -> Iterator[tuple[LocalIssuer, str]]:
    """Firebase Auth's stand-in for /ws tokens; the project is the emulator project the
    container reads."""
    found = LocalIssuer(f"image-{uuid.uuid4().hex[:8]}")
    url = found.serve()
    yield found, url
    found.close()


@pytest.fixture(scope="module")
def container(
    image: Image,
    rootfs: Path,
    redis_server: RedisServer,
    emulator: FirestoreEmulator,
    issuer: tuple[LocalIssuer, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Container]:
    port = free_port()
    task = service_container(task_definition())
    task_env = {e["name"]: e["value"] for e in task["environment"]}
    # Google's Secret Manager and ElastiCache are not here: their settings give way to the
    # emulator, the test's redis-server (no TLS, no user) and a local token issuer.
    for name in ("GOOGLE_PROJECT_ID", "GOOGLE_SERVICE_ACCOUNT_SECRET", "AWS_SECRET_NAME"):
        task_env.pop(name, None)
    env = {
        **dict(e.split("=", 1) for e in image.config["Env"]),
        "HOME": docker_home(rootfs, image.user[0]),
        **task_env,
        "LISTENERS_REDIS_HOST": "127.0.0.1",
        "LISTENERS_REDIS_PORT": str(redis_server.port),
        "LISTENERS_REDIS_TLS": "false",
        "FIRESTORE_EMULATOR_HOST": emulator.host,
        "LISTENERS_FIRESTORE_TARGETS_PER_STREAM": os.environ["LISTENERS_FIRESTORE_TARGETS_PER_STREAM"],
        "FIREBASE_PROJECT_ID": issuer[0].project_id,
        "LISTENERS_TOKEN_CERTS_URL": issuer[1],
        "LISTENERS_ALLOWED_ORIGINS": "https://app.example.com",
    }
    command = [str(port) if arg == "8080" else arg for arg in image.config["Cmd"]]
    user = "{}:{}".format(*image.user)
    log = tmp_path_factory.mktemp("container") / "container.log"
    launch = [
        *("unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation=private"),
        *("--", "sh", "-c", LAUNCH, "launch", str(rootfs), user, image.config["WorkingDir"]),
        *(f"{k}={v}" for k, v in env.items()),
        *command,
    ]
    started = time.monotonic()
    with log.open("wb") as output:
        launcher = subprocess.Popen(launch, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    pid = 0
    try:
        while not pid:  # unshare forks PID 1 at once
            assert launcher.poll() is None, log.read_text()
            children = psutil.Process(launcher.pid).children()
            pid = children[0].pid if children else 0
            time.sleep(0 if pid else 0.01)
        first_200_after, status = 0.0, ""
        deadline = started + 120  # the assertion on the start period is the test's, with its number
        while status != "ok":
            assert launcher.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"/healthz not ok after 120 s:\n{log.read_text()}"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200:
                first_200_after = first_200_after or time.monotonic() - started
                status = response.json()["status"]
            else:
                time.sleep(0.1)
        yield Container(launcher, pid, port, env, image.user, log, first_200_after)
    finally:
        # PID 1 itself, by its pid: unshare's --kill-child (a parent-death signal) holds only
        # until chroot changes user. When PID 1 ends, the kernel ends its whole namespace.
        if launcher.poll() is None:
            first, left = pid or launcher.pid, []
            with contextlib.suppress(psutil.NoSuchProcess):
                left = [psutil.Process(first), *psutil.Process(first).children(recursive=True)]
            with contextlib.suppress(ProcessLookupError):
                os.kill(first, signal.SIGKILL)
            launcher.wait(timeout=60)
            assert psutil.wait_procs(left, timeout=30)[1] == []


def test_healthz_answers_within_the_start_period_and_the_healthcheck_passes(
    image: Image, container: Container
) -> None:
    start_period = image.healthcheck["StartPeriod"] / 1e9
    assert container.first_200_after < start_period, container.log.read_text()
    # ECS runs the task definition's check, not the image's: they are the same.
    task = service_container(task_definition())
    assert task["healthCheck"]["command"] == image.healthcheck["Test"]
    assert task["healthCheck"]["startPeriod"] == start_period
    kind, *command = image.healthcheck["Test"]
    assert kind == "CMD"
    command = [arg.replace(":8080/", f":{container.port}/") for arg in command]
    result = container.exec(*command, timeout=image.healthcheck["Timeout"] / 1e9)
    assert result.returncode == 0, result.stderr


def test_the_service_runs_as_its_user_and_writes_nothing_outside_tmp(
    image: Image, container: Container
) -> None:
    assert image.user == (10001, 10001)
    processes = container.processes()
    assert ns_pid(processes[0]) == 1 and "uvicorn" in " ".join(processes[0].cmdline())
    for process in processes:
        assert process.uids() == (10001, 10001, 10001), process
        assert process.gids() == (10001, 10001, 10001), process
        groups = re.search(r"^Groups:(.*)$", Path(f"/proc/{process.pid}/status").read_text(), re.M)
        assert groups is not None and set(groups.group(1).split()) <= {"10001"}, process
    # As its user, it tries to create a file in every directory and to open every file for
    # writing (without writing): only /tmp takes anything.
    probe = r"""
import json, os
found = []
for directory, dirs, files in os.walk("/"):
    if directory == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    try:
        os.close(os.open(os.path.join(directory, ".probe"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.unlink(os.path.join(directory, ".probe"))
        found.append(directory)
    except OSError:
        pass
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.islink(path):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
                found.append(path)
            except OSError:
                pass
print(json.dumps(found))
"""
    result = container.exec("python", "-c", probe)
    assert result.returncode == 0, result.stderr
    writable = json.loads(result.stdout)
    assert "/tmp" in writable
    assert [p for p in writable if p != "/tmp" and not p.startswith("/tmp/")] == []


def test_the_venv_is_imported_from_its_compiled_bytecode(container: Container) -> None:
    """The __pycache__ policy (docs/deploy.md): the image keeps the .pyc files pip wrote, and they
    are valid there (COPY keeps the sources' times), so that no worker compiles the venv again at
    each start on its read-only root."""
    result = container.exec(
        "python", "-v", "-c", "import listeners.service, listeners.deliver.http, uvicorn, grpc"
    )
    assert result.returncode == 0, result.stderr[-5000:]
    loaded = re.findall(r"^# code object from '?([^'\n]+)'?$", result.stderr, re.M)
    assert len([p for p in loaded if p.startswith("/opt/venv/")]) > 100
    assert [p for p in loaded if p.startswith("/opt/venv/") and p.endswith(".py")] == []


def test_two_workers_serve(container: Container) -> None:
    """WEB_CONCURRENCY=2 as in the task definition: two worker processes of PID 1, each its own
    instance (`{host}-{pid}-{random}`, its pid as the container numbers it) answering."""
    assert container.env["WEB_CONCURRENCY"] == "2"
    assert container.env["UVICORN_WS"] == "listeners.deliver.wsprotocol:DirectWebSocketProtocol"
    workers = {ns_pid(p): p for p in psutil.Process(container.pid).children()}
    ids: set[str] = set()
    deadline = time.monotonic() + 120
    while len(ids) < 2 and time.monotonic() < deadline:
        with httpx.Client() as http:  # a new connection each time: the kernel picks the worker
            ids.add(http.get(f"http://127.0.0.1:{container.port}/version", timeout=10).json()["instance_id"])
    assert len(ids) == 2, ids
    pids = {int(i.rsplit("-", 2)[-2]) for i in ids}
    assert len(pids) == 2 and pids <= set(workers), (ids, workers)


def test_the_operator_cli_in_the_image(container: Container, issuer: tuple[LocalIssuer, str]) -> None:
    """The `listeners` command, as docs/deploy.md runs it in a one-off task: the configuration,
    then /healthz, a WebSocket with a token (and with a forged one) and a Redis round trip."""
    check = container.exec("listeners", "config", "check")
    assert check.returncode == 0 and "configuration ok" in check.stdout, check.stdout + check.stderr
    smoke = [
        *("listeners", "smoke", "--url", f"http://127.0.0.1:{container.port}"),
        *("--origin", "https://app.example.com", "--timeout", "30", "--ws-wait", "30"),
    ]
    result = container.exec(*smoke, "--token", issuer[0].mint("smoke-user"), "--redis")
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("PASS  healthz", "PASS  websocket", "auth.ok for uid 'smoke-user'", "PASS  redis"):
        assert line in result.stdout, result.stdout
    forged = LocalIssuer(issuer[0].project_id).mint("smoke-user")  # right shape, unknown key
    result = container.exec(*smoke, "--token", forged)
    assert result.returncode == 1 and "FAIL  websocket" in result.stdout and "token refused" in result.stdout


def test_sigterm_to_pid_1_ends_everything_within_the_stop_timeout(container: Container) -> None:
    """ECS stops a task with SIGTERM to PID 1, then SIGKILL after stopTimeout: everything must
    have ended before, both workers having stopped their service (not killed with PID 1)."""
    task = service_container(task_definition())
    everything = container.processes()
    assert len(everything) >= 3  # PID 1 and its two workers
    started = time.monotonic()
    os.kill(container.pid, signal.SIGTERM)
    # The wait's own limit has a margin: an overrun shows as a number, not as a timeout.
    status = container.launcher.wait(timeout=task["stopTimeout"] + 60)
    took = time.monotonic() - started
    output = container.log.read_text()
    assert took < task["stopTimeout"], f"{took:.1f} s\n{output}"
    assert status == 0, output
    assert psutil.wait_procs(everything, timeout=10)[1] == []
    assert output.count('"service stopped"') == 2, output
