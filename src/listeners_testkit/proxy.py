"""A TCP proxy for fault tests: forwards to one target, and on demand breaks the path.

    with TcpProxy(target_port=redis.port) as proxy:    # point the code under test at proxy.port
        proxy.freeze()      # open connections go silent, new ones still work
        proxy.blackhole()   # new connections are accepted and go nowhere, too
        proxy.thaw()        # everything forwards again (held bytes are delivered)
        proxy.reset()       # every open connection is closed with a RST

`freeze` models a half-open connection: a dropped NAT or conntrack entry, an idle flow a load
balancer forgot, a failover where the old path is dead and a new one works. Nothing is closed:
no FIN, no RST; bytes written on either side are held (neither side's reads return) until
`thaw` or `close`. A frozen connection also never notices its peer closing, as across a real
cut. "Open" means accepted by the proxy: a connection still in the listen backlog counts as
new (clients here have long been connected when a test freezes them). `blackhole` is the
whole path dead: SYNs are answered (by this proxy) and then nothing.

The proxy runs its own event loop in its own thread, so it keeps working (and can be thawed)
while the code under test stalls its loop. The control methods are plain synchronous calls
from any thread; each returns once the proxy has applied it.

Every connection keeps the first bytes it carried towards the target, with their arrival
times (`Link.sent`, `Link.at`), so a test can see on the wire that a client reconnected and,
for Redis, what it subscribed to, without looking inside that client.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

RTO = 0.2  # Linux's minimum retransmission timeout: what a lost segment costs at least
SHAPED_BUFFER = 4 * 2**20  # bytes held in flight per direction while shaped, before reading waits
HEAD_BYTES = 64 * 1024  # of each connection's traffic towards the target, kept for inspection
CLOSED_KEPT = 1000  # closed connections whose head `links()` still shows
CHUNK = 64 * 1024
CONTROL_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Link:
    """What one proxied connection looked like when it was asked for (a snapshot)."""

    id: int
    opened_at: float  # time.monotonic() when accepted
    frozen: bool
    closed: bool
    chunks: tuple[tuple[float, bytes], ...]  # (monotonic arrival, bytes) towards the target

    @property
    def sent(self) -> bytes:
        """The first `HEAD_BYTES` (about) the client sent towards the target."""
        return b"".join(data for _, data in self.chunks)

    def at(self, offset: int) -> float | None:
        """When the byte at `offset` of `sent` arrived at the proxy (None: not yet)."""
        end = 0
        for arrived, data in self.chunks:
            end += len(data)
            if offset < end:
                return arrived
        return None


@dataclass(frozen=True, slots=True)
class Stats:
    opened: int  # connections accepted since start
    live: int  # accepted and not closed yet (frozen ones included)
    frozen: int  # live connections that do not forward


Selector = Callable[[Link], bool]


class _Connection:
    """One accepted client and, once forwarding is allowed, its connection to the target."""

    def __init__(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.id = number
        self.opened_at = time.monotonic()
        self.client = (reader, writer)
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.forwarding = asyncio.Event()  # cleared: frozen (reads and writes both wait)
        self.closed = False
        self.chunks: list[tuple[float, bytes]] = []
        self._kept = 0

    def snapshot(self) -> Link:
        frozen = not self.forwarding.is_set() and not self.closed
        return Link(self.id, self.opened_at, frozen, self.closed, tuple(self.chunks))

    def keep(self, data: bytes) -> None:
        if self._kept < HEAD_BYTES:
            self.chunks.append((time.monotonic(), data[: HEAD_BYTES - self._kept]))
            self._kept += len(self.chunks[-1][1])

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client[1]] + ([self.upstream[1]] if self.upstream else [])

    def close(self, *, rst: bool) -> None:
        self.closed = True
        for writer in self.writers():
            if rst:  # SO_LINGER 0: close() sends a RST instead of a FIN
                with contextlib.suppress(OSError, AttributeError):
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
        self.forwarding.set()  # wake the pumps, which then find the streams closed


class _Delayed:
    """One direction's chunks, written in order, each not before its due time (see `shape`)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.held = 0
        self.room = asyncio.Event()
        self.room.set()
        self.task: asyncio.Task[None] | None = None
        self.last_due = 0.0
        self.failed = False

    @property
    def busy(self) -> bool:
        """Chunks still held: a chunk that is not delayed must wait behind them."""
        return self.held > 0

    async def put(self, due: float, data: bytes) -> None:
        await self.room.wait()
        if self.failed:
            raise OSError("the shaped direction's writer failed")
        self.last_due = max(self.last_due, due)  # never before what came first
        self.held += len(data)
        if self.held >= SHAPED_BUFFER:
            self.room.clear()
        self.queue.put_nowait((self.last_due, data))
        if self.task is None:
            self.task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        try:
            while True:
                due, data = await self.queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                self.writer.write(data)
                await self.writer.drain()
                self.held -= len(data)
                if self.held < SHAPED_BUFFER:
                    self.room.set()
                self.queue.task_done()
        except (OSError, RuntimeError):
            self.failed = True  # reset or closed under us: the reading side stops too
            self.room.set()

    async def flush(self) -> None:
        if self.task is not None and self.busy:
            done = asyncio.ensure_future(self.queue.join())
            await asyncio.wait([done, self.task], return_when=asyncio.FIRST_COMPLETED)
            done.cancel()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class TcpProxy:
    """Forwards `host:port` (port 0: a free one, see `.port`) to `target_host:target_port`."""

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[int, _Connection] = {}  # open, and closing until the handler ends
        # what closed connections sent, not their streams: a soak closes thousands of them
        self._closed: collections.deque[Link] = collections.deque(maxlen=CLOSED_KEPT)
        self._numbers = itertools.count(1)
        self._opened = 0
        self._handlers: set[asyncio.Task[Any]] = set()
        self._accepting_forwards = True  # False while blackholed
        self._delay = 0.0  # seconds added to each chunk, each way (`shape`)
        self._loss = 0.0
        self._random = random.Random(0)

    # -- lifecycle (any thread) ----------------------------------------------------

    def start(self) -> Self:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop = loop

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name=f"tcp-proxy-{self.target[1]}", daemon=True)
        self._thread.start()
        ready.wait(CONTROL_TIMEOUT)
        self._server = self._call(asyncio.start_server(self._accept, self.host, self.port))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def close(self) -> None:
        """Stop listening and close every connection (a FIN each, even if frozen)."""
        if self._loop is None or self._thread is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- faults (any thread) ---------------------------------------------------------

    def freeze(self, where: Selector | None = None) -> int:
        """Stop forwarding on the open connections (those `where` selects), both ways, without
        closing them. New connections still forward. Returns how many were frozen."""

        async def apply() -> int:
            chosen = [c for c in self._live() if where is None or where(c.snapshot())]
            for connection in chosen:
                connection.forwarding.clear()
            return len(chosen)

        return self._call(apply())

    def blackhole(self) -> None:
        """Freeze every open connection, and accept new ones without ever forwarding them (they
        are not even connected to the target)."""

        async def apply() -> None:
            self._accepting_forwards = False
            for connection in self._live():
                connection.forwarding.clear()

        self._call(apply())

    def thaw(self) -> None:
        """Forward everything again: held bytes are delivered, blackholed connections connect."""

        async def apply() -> None:
            self._accepting_forwards = True
            for connection in self._live():
                connection.forwarding.set()

        self._call(apply())

    restore = thaw

    def shape(self, delay: float, loss: float = 0.0) -> None:
        """A slow, lossy path: each chunk is delivered `delay` seconds after it arrived, in
        order, each way; with probability `loss` it is held one retransmission timeout more
        (`RTO`, plus the delay), and what follows it waits behind it, as TCP does when a
        segment is lost (a stream never loses bytes; loss shows as stalls). `shape(0)` ends it.
        """

        async def apply() -> None:
            self._delay, self._loss = max(0.0, delay), min(max(0.0, loss), 1.0)

        self._call(apply())

    def reset(self, where: Selector | None = None) -> int:
        """Close the open connections (those `where` selects) with a RST on both sides."""

        async def apply() -> int:
            chosen = [c for c in self._live() if where is None or where(c.snapshot())]
            for connection in chosen:
                connection.close(rst=True)
            return len(chosen)

        return self._call(apply())

    # -- observation (any thread) --------------------------------------------------

    def stats(self) -> Stats:
        async def read() -> Stats:
            live = self._live()
            frozen = sum(1 for c in live if not c.forwarding.is_set())
            return Stats(self._opened, len(live), frozen)

        return self._call(read())

    def links(self) -> list[Link]:
        """The connections accepted so far, oldest first: the open ones and the last
        `CLOSED_KEPT` closed ones."""

        async def read() -> list[Link]:
            return [*self._closed, *(c.snapshot() for c in self._connections.values())]

        return self._call(read())

    # -- inside the proxy's loop ---------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the proxy is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT)

    def _live(self) -> list[_Connection]:
        return [c for c in self._connections.values() if not c.closed]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(next(self._numbers), reader, writer)
        self._connections[connection.id] = connection
        self._opened += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        if self._accepting_forwards:
            connection.forwarding.set()
        try:
            await connection.forwarding.wait()  # blackholed: wait here, never connected
            if connection.closed:
                return
            try:
                connection.upstream = await asyncio.open_connection(*self.target)
            except OSError:
                connection.close(rst=True)  # as a refused connection looks to the client
                return
            up_reader, up_writer = connection.upstream
            await asyncio.gather(
                self._pump(connection, reader, up_writer, keep=True),
                self._pump(connection, up_reader, writer, keep=False),
            )
        finally:
            if not connection.closed:
                connection.close(rst=False)
            del self._connections[connection.id]
            self._closed.append(connection.snapshot())

    async def _pump(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        keep: bool,
    ) -> None:
        """One direction. Frozen, it neither reads nor writes: what was sent waits in the
        buffers, and an end of stream is not passed on either. Either side ending, or failing,
        ends the connection (Redis clients never half-close)."""
        late = _Delayed(writer)
        try:
            while not connection.closed:
                await connection.forwarding.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                await connection.forwarding.wait()  # frozen while reading: hold this chunk
                if connection.closed:
                    break
                if keep:
                    connection.keep(data)
                if self._delay or self._loss or late.busy:
                    lost = self._random.random() < self._loss
                    await late.put(
                        time.monotonic() + self._delay + (RTO + self._delay if lost else 0.0), data
                    )
                    continue
                writer.write(data)
                await writer.drain()
            await late.flush()
        except (OSError, RuntimeError):
            pass  # reset or closed under us
        finally:
            late.cancel()
            if not connection.closed:
                connection.close(rst=False)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in self._live():
            connection.close(rst=False)
        if self._handlers:  # let the pumps see it and end, so the loop closes with no task left
            _, stuck = await asyncio.wait(self._handlers, timeout=2.0)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1.0)


class ProxyProcess:
    """A `TcpProxy` in a process of its own, with the same fault controls.

    A benchmark that measures latency in its own event loop uses this: an in-process proxy
    forwarding every byte of every dependency would share the benchmark's GIL, and its work
    would show up as the benchmark's pauses. Driven through `main`'s commands on stdin."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> Self:
        command = [sys.executable, "-m", "listeners_testkit.proxy", "--target", "{}:{}".format(*self.target)]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        answer = self._read()
        if not answer.startswith("listening "):
            self.close()
            raise RuntimeError(f"the proxy did not start: {answer!r}")
        self.port = int(answer.split()[1])
        return self

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()  # end of commands: the proxy closes and exits
        try:
            process.wait(CONTROL_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def blackhole(self) -> None:
        self._ask("blackhole")

    def thaw(self) -> None:
        self._ask("thaw")

    def reset(self) -> int:
        return int(self._ask("reset").split()[1])

    def shape(self, delay: float, loss: float = 0.0) -> None:
        self._ask(f"shape {delay!r} {loss!r}")

    def _ask(self, command: str) -> str:
        process = self._process
        if process is None or process.stdin is None:
            raise RuntimeError("the proxy is not running")
        process.stdin.write(command + "\n")
        process.stdin.flush()
        return self._read()

    def _read(self) -> str:
        process = self._process
        assert process is not None and process.stdout is not None
        line = process.stdout.readline().strip()  # each command answers at once (CONTROL_TIMEOUT)
        if not line or line.startswith(("unknown", "refused")):
            raise RuntimeError(f"the proxy answered {line!r} (exit code {process.poll()})")
        return line


def main(argv: list[str] | None = None) -> None:
    """`python -m listeners_testkit.proxy --listen PORT --target HOST:PORT`, controlled by lines
    on stdin: freeze, blackhole, thaw, reset, stats, `shape DELAY LOSS`. Each answers one line
    on stdout; the end of stdin closes the proxy."""
    parser = argparse.ArgumentParser(prog="python -m listeners_testkit.proxy", description=main.__doc__)
    parser.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    with TcpProxy(int(port), host or "127.0.0.1", port=args.listen) as proxy:
        print(f"listening {proxy.port}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "freeze":
                print(f"frozen {proxy.freeze()}", flush=True)
            elif command == "blackhole":
                proxy.blackhole()
                print("blackholed", flush=True)
            elif command in ("thaw", "restore"):
                proxy.thaw()
                print("thawed", flush=True)
            elif command == "reset":
                print(f"reset {proxy.reset()}", flush=True)
            elif command.startswith("shape "):
                try:
                    _, delay, loss = command.split()
                    proxy.shape(float(delay), float(loss))
                except ValueError:  # one bad line is refused; the proxy goes on
                    print(f"refused {command!r}: want shape DELAY LOSS", flush=True)
                else:
                    print("shaped", flush=True)
            elif command == "stats":
                stats = proxy.stats()
                print(f"opened {stats.opened} live {stats.live} frozen {stats.frozen}", flush=True)
            elif command:
                print(f"unknown command {command!r}", flush=True)


if __name__ == "__main__":
    main()
