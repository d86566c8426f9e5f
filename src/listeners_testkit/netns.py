"""A network namespace behind a veth pair, whose link can be blackholed, for fault tests.

    with Namespace.create("redis") as ns:              # lsn15-<pid>-redis, 10.215.N.2 inside
        ns.run([...])                                  # a command inside (`ip netns exec`)
        ns.blackhole()                                 # every packet dropped, both ways, silently
        ns.heal()

A blackhole sets the inner end of the veth pair down: packets sent to it are dropped without
any answer, whichever side sends them. Both ends have permanent neighbour entries, so a new
connection's SYN is dropped too (instead of failing at once with "no route to host" once ARP
gives up): an established connection goes silent, a new one hangs, as across a dead path.
`delay`/`loss` use `tc netem` where the kernel has it (`netem_available()`); where it has not,
the caller shapes the traffic elsewhere (the fault lab uses `TcpProxy.shape`).

Needs root and `ip netns` (`available()` says whether this process can make one). Names and
addresses are unique to this process: names carry its pid, the /30 networks are taken from
10.215.0.0/16 under a lock file and skipped when any interface of the machine already uses
them. Everything is removed in `close()` (a context manager does it).
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

POOL = ipaddress.IPv4Network("10.215.0.0/16")
LOCK = Path(tempfile.gettempdir()) / "listeners-netns.lock"  # shared by design: one pool per machine
PREFIX = "lsn15"
_names = itertools.count()


class NamespaceError(RuntimeError):
    pass


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", *args] if namespace is None else ["ip", "netns", "exec", namespace, "ip", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    if check and result.returncode != 0:
        raise NamespaceError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result


def available() -> tuple[bool, str]:
    """Whether this process can create network namespaces, and why not when it cannot."""
    if shutil.which("ip") is None:
        return False, "the `ip` command is not installed"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    name = f"{PREFIX}-probe-{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return False, f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return True, ""


def netem_available() -> bool:
    """Whether the kernel has the netem queueing discipline (a Firecracker VM may not)."""
    if shutil.which("tc") is None or not available()[0]:
        return False
    with Namespace.create("netem-probe") as ns:
        return (
            subprocess.run(
                ["tc", "qdisc", "add", "dev", ns.outer, "root", "netem", "delay", "1ms"],
                capture_output=True,
                timeout=10,
                check=False,
            ).returncode
            == 0
        )


def _used_networks() -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10)
    used = set()
    for line in shown.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.add(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return used


class Namespace:
    """One namespace, its veth pair, and the /30 between them (outer .1, inner .2)."""

    def __init__(self, name: str, outer: str, inner: str, network: ipaddress.IPv4Network) -> None:
        self.name = name
        self.outer = outer  # the veth end in the root namespace
        self.inner = inner  # the end inside
        hosts = list(network.hosts())
        self.outer_address, self.address = str(hosts[0]), str(hosts[1])
        self.network = network
        self.shaped = False

    @classmethod
    def create(cls, role: str) -> Namespace:
        number = next(_names)
        pid = os.getpid()
        name = f"{PREFIX}-{pid}-{number}-{role}"[:40]
        # interface names are at most 15 bytes
        outer, inner = f"l{pid % 100000}x{number}a"[:15], f"l{pid % 100000}x{number}b"[:15]
        LOCK.touch(exist_ok=True)
        with LOCK.open() as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _used_networks()
            network = next(
                (n for n in POOL.subnets(new_prefix=30) if not any(n.overlaps(u) for u in used)), None
            )
            if network is None:
                raise NamespaceError(f"no free /30 left in {POOL}")
            ns = cls(name, outer, inner, network)
            try:
                ns._build()
            except BaseException:
                ns.close()
                raise
        return ns

    def _build(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _ip("link", "set", self.inner, "netns", self.name)
        _ip("addr", "add", f"{self.outer_address}/30", "dev", self.outer)
        _ip("link", "set", self.outer, "up")
        _ip("addr", "add", f"{self.address}/30", "dev", self.inner, namespace=self.name)
        _ip("link", "set", self.inner, "up", namespace=self.name)
        _ip("link", "set", "lo", "up", namespace=self.name)
        inner_mac = (
            _ip("link", "show", self.inner, namespace=self.name).stdout.split("link/ether ")[1].split()[0]
        )
        outer_mac = _ip("link", "show", self.outer).stdout.split("link/ether ")[1].split()[0]
        # No ARP: with the link down, a SYN is then dropped rather than refused with EHOSTUNREACH.
        _ip("neigh", "replace", self.address, "lladdr", inner_mac, "nud", "permanent", "dev", self.outer)
        _ip(
            "neigh", "replace", self.outer_address, "lladdr", outer_mac, "nud", "permanent",
            "dev", self.inner, namespace=self.name,
        )  # fmt: skip

    def command(self, command: list[str]) -> list[str]:
        """`command` run inside the namespace (`ip netns exec` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *command]

    def blackhole(self) -> None:
        _ip("link", "set", self.inner, "down", namespace=self.name)

    def heal(self) -> None:
        _ip("link", "set", self.inner, "up", namespace=self.name)
        if self.shaped:
            _ip("link", "set", "dev", self.outer, "up")
            subprocess.run(
                ["tc", "qdisc", "del", "dev", self.outer, "root"], capture_output=True, check=False
            )
            subprocess.run(
                ["ip", "netns", "exec", self.name, "tc", "qdisc", "del", "dev", self.inner, "root"],
                capture_output=True,
                check=False,
            )
            self.shaped = False

    def shape(self, delay_ms: float, loss_percent: float) -> None:
        """netem on both ends (half the delay each way); NamespaceError where netem is missing."""
        spec = ["netem", "delay", f"{delay_ms / 2:g}ms", "loss", f"{loss_percent / 2:g}%"]
        for command in (
            ["tc", "qdisc", "replace", "dev", self.outer, "root", *spec],
            ["ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev", self.inner, "root", *spec],
        ):
            result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
            if result.returncode != 0:
                raise NamespaceError(f"{' '.join(command)}: {result.stderr.strip()}")
        self.shaped = True

    def close(self) -> None:
        """Remove the namespace and the veth pair (deleting one end deletes both). Processes
        still inside are not killed here: their owner stops them first."""
        _ip("link", "del", self.outer, check=False)
        _ip("netns", "del", self.name, check=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
