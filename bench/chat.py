"""
Chat benchmarks: twistd sockd-chat against a minimal asyncio relay
(bench/ref_chat_asyncio.py) doing the same relay work.

    python -m bench.chat [--quick] [--rounds N] [--seconds S] [--only WORD]

Relay: one member says 48-byte lines as fast as the relay takes them; the
others, all in one room, count what they receive (delivered datagrams/s)
with 1, 100 and 1000 receiving members.  Members are UDP sockets on
127.0.0.1, validated first (sockd's cookie).  Memory: server RSS growth per
member with 10,000 members (in rooms of 100).  Runs alternate between the
contenders, each bounded to a few seconds.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import re
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from bench import (
    Result,
    Server,
    emit,
    paired_ratios,
    python_server,
    raise_nofile,
    sockd_daemon,
)

TOKEN = re.compile(rb"/v ([a-z2-7]{8})\b")
HELLO = b"/hello bench".ljust(48) + b"\n"
MESSAGE = b"m" * 47 + b"\n"
#: a message carrying its send time (time.monotonic()), as relayed: the
#: members' side takes the latency from it
PROBE = b"probe %.6f"
PROBE_END = b"!\n"

SOCKD_INI = """\
    [echo]
    enabled = false
    [chat]
    listen = udp:0:interface=127.0.0.1
    idle_timeout = 86400
    history = 20
    max_members = 20000
    max_members_per_ip = 20000
    max_rooms = 1000
    max_room_members = 20000
    rate = 1000000
    burst = 1000000
    total_output_rate = 1000000000
    validation = true
"""

#: run in the daemon before twistd: joining 10,000 members from one host
#: should not wait on the handshake budget meant for spoofed floods; and
#: no "joined"/"left" notices while rooms fill (N members joining one room
#: would cost N*N/2 datagrams; the asyncio relay sends none either)
PRELUDE = """\
import sockd.chat.state as c
c.ChatState.handshake_rate = 1e9
def _quiet_enter(self, member, room, _enter=c.ChatState._enter):
    self._fanout = lambda *args: None
    try:
        _enter(self, member, room)
    finally:
        del self._fanout
c.ChatState._enter = _quiet_enter
"""


def start(name: str) -> Server:
    if name == "sockd":
        return sockd_daemon("sockd", "sockd-chat", SOCKD_INI, PRELUDE).start()
    return python_server("asyncio", "bench.ref_chat_asyncio").start()


def probe(now: float) -> bytes:
    """A 48-byte message that says when it was sent."""
    return (PROBE % now).ljust(46, b"!") + PROBE_END


def probe_sent(data: bytes) -> float | None:
    """The send time in a relayed L{probe}; None for any other datagram."""
    if not data.endswith(PROBE_END):
        return None
    start = data.find(b"probe ")
    try:
        return float(data[start + 6 : data.index(b"!", start)]) if start >= 0 else None
    except ValueError:
        return None


def member_socket() -> socket.socket:
    """A member's UDP socket on 127.0.0.1, not yet joined anywhere."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    s.bind(("127.0.0.1", 0))
    return s


def member(port: int, room: str | None = None) -> socket.socket:
    """A socket that has joined (validated, for sockd) and is in C{room}."""
    return join(member_socket(), port, room)


def join(s: socket.socket, port: int, room: str | None = None) -> socket.socket:
    """Join C{s} to the relay on C{port} (validated, for sockd), in C{room}."""
    s.connect(("127.0.0.1", port))
    s.settimeout(5.0)
    s.send(HELLO)
    while True:
        reply = s.recv(4096)
        token = TOKEN.search(reply)
        if token:
            s.send(b"/v " + token.group(1) + b"\n")
        elif reply.startswith(b"*** welcome, you are"):
            break
    if room:
        s.send(b"/join " + room.encode() + b"\n")
        while not s.recv(4096).startswith(b"*** you joined #" + room.encode()):
            pass
    return s


def drain(sockets: list[socket.socket], quiet: float = 0.3) -> None:
    """Read everything queued until C{quiet} seconds pass with nothing."""
    selector = selectors.DefaultSelector()
    for s in sockets:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = selector.select(quiet)
            if not ready:
                return
            for key, _ in ready:
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    while True:
                        sock.recv(4096)
                except BlockingIOError:
                    pass
    finally:
        selector.close()


def receive(
    sockets: list[socket.socket], start_at: float, stop_at: float, out: Connection
) -> None:
    """Child process: count datagrams arriving between two instants."""
    selector = selectors.EpollSelector()
    for s in sockets:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
    counted = 0
    out.send("ready")
    while True:
        now = time.monotonic()
        if now >= stop_at:
            break
        for key, _ in selector.select(0.05):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            n = 0
            try:
                while True:
                    sock.recv(4096)
                    n += 1
            except BlockingIOError:
                pass
            if start_at <= time.monotonic() < stop_at:
                counted += n
    out.send(counted)


class Room:
    """One server with a sender and C{receivers} members in room "bench"."""

    def __init__(self, name: str, receivers: int) -> None:
        self.server = start(name)
        self.port = self.server.ports["udp"]
        self.sender = member(self.port, "bench")
        self.receivers = [member(self.port, "bench") for _ in range(receivers)]
        drain([*self.receivers, self.sender])
        self.sender.setblocking(True)

    def admit(self, sockets: list[socket.socket]) -> None:
        """
        Join sockets that another room's server knows too: a UDP socket
        hears only the server it is connected to, and L{run_window}
        connects each receiver to this one first, so two servers can share
        members.
        """
        for s in sockets:
            join(s, self.port, "bench")
        drain(sockets)
        self.receivers.extend(sockets)

    def run(
        self, seconds: float, warmup: float, cpu: list[float], work: list[float]
    ) -> float:
        """Delivered datagrams/s; notes server CPU share and datagrams/CPU-s."""
        start_at = time.monotonic() + 0.3 + warmup
        stop_at = start_at + seconds
        ours, theirs = multiprocessing.Pipe()
        child = multiprocessing.get_context("fork").Process(
            target=receive, args=(self.receivers, start_at, stop_at, theirs)
        )
        child.start()
        ours.recv()
        # Enough offered load for any relay here, paced so the sender does
        # not take the CPU the relay and the receivers need.
        per_second = 400_000 / len(self.receivers)
        began = time.monotonic()
        before: float | None = None
        sent = 0
        while True:
            now = time.monotonic()
            if before is None and now >= start_at:
                before = self.server.cpu()
            if now >= stop_at:
                break
            for _ in range(50):
                self.sender.send(MESSAGE)
            sent += 50
            ahead = sent / per_second - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(min(ahead, max(0.0, stop_at - time.monotonic())))
        used = self.server.cpu() - (before or 0.0)
        counted: int = ours.recv()
        cpu.append(used / seconds)
        work.append(counted / used if used > 0 else 0.0)
        child.join(10)
        drain(self.receivers, 0.1)
        return counted / seconds

    def run_window(
        self, seconds: float, warmup: float, window: int, latencies: list[float]
    ) -> tuple[float, float]:
        """
        A closed loop, like the echo's lines in flight: at most C{window}
        messages sent and not yet delivered to the last member to join (the
        last one the relay sends each message to), which this process
        watches; the queues stay short and latency means something.  Every
        message is a L{probe}: C{latencies} gets, for each, the seconds from
        sending it until the whole room had it.  The other members are not
        read: their receive buffers are made small, and the kernel drops
        what overflows them after the relay has done its work.  Returns
        (datagrams relayed a second, server CPU seconds per datagram).
        """
        watch, others = self.receivers[-1], self.receivers[:-1]
        for s in self.receivers:
            s.connect(("127.0.0.1", self.port))
        for s in others:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        drain([watch], 0.05)
        watch.settimeout(0.5)
        start_at = time.monotonic() + warmup
        stop_at = start_at + seconds
        before: float | None = None
        in_flight = delivered = 0
        while True:
            now = time.monotonic()
            if before is None and now >= start_at:
                before = self.server.cpu()
            if now >= stop_at:
                break
            while in_flight < window:
                self.sender.send(probe(time.monotonic()))
                in_flight += 1
            try:
                data = watch.recv(4096)
            except TimeoutError:
                in_flight = 0  # lost on the way: start the window over
                continue
            in_flight -= 1
            arrived = time.monotonic()
            sent = probe_sent(data)
            if sent is not None and start_at <= arrived < stop_at:
                delivered += 1
                latencies.append(arrived - sent)
        used = self.server.cpu() - (before or 0.0)
        drain([watch], 0.05)
        relayed = delivered * len(self.receivers)
        return relayed / seconds, used / relayed if relayed else math.inf

    def close(self) -> None:
        for s in [self.sender, *self.receivers]:
            s.close()
        self.server.stop()


def relay(receivers: int, opts: argparse.Namespace) -> list[Result]:
    rooms = {name: Room(name, receivers) for name in ("sockd", "asyncio")}
    cpu: dict[str, list[float]] = {name: [] for name in rooms}
    work: dict[str, list[float]] = {name: [] for name in rooms}
    samples: dict[str, list[float]] = {name: [] for name in rooms}
    try:
        for _ in range(opts.rounds):
            for name, room in rooms.items():
                samples[name].append(
                    room.run(opts.seconds, opts.warmup, cpu[name], work[name])
                )
    finally:
        for room in rooms.values():
            room.close()
    note = "server CPU (cores, median): " + ", ".join(
        f"{name} {statistics.median(v):.2f}" for name, v in cpu.items()
    )
    scenario = f"relay to {receivers} member{'s' if receivers > 1 else ''}"
    return [
        Result(
            "chat",
            scenario,
            "datagrams/s",
            samples,
            paired_ratios(samples),
            goals={"asyncio": 1.0},
            note=note,
        ),
        Result(
            "chat",
            scenario + ", per server CPU-second",
            "datagrams/CPU-s",
            work,
            paired_ratios(work),
            note="delivered / server CPU seconds: the relay's own cost, "
            "whatever else limits the rate",
        ),
    ]


def memory(count: int, opts: argparse.Namespace) -> list[Result]:
    samples: dict[str, list[float]] = {"sockd": [], "asyncio": []}
    for _ in range(opts.memory_rounds):
        for name in samples:
            server = start(name)
            sockets: list[socket.socket] = []
            try:
                port = server.ports["udp"]
                # a few members first, so the baseline includes warm caches
                sockets = [member(port, "warm") for _ in range(10)]
                drain(sockets, 0.1)
                base = server.rss()
                for i in range(count):
                    sockets.append(member(port, f"r{i // 100}"))
                    if i % 500 == 499:
                        drain(sockets[-500:], 0.0)
                drain(sockets, 0.2)
                samples[name].append((server.rss() - base) / count)
            finally:
                for s in sockets:
                    s.close()
                server.stop()
    return [
        Result(
            "chat",
            f"memory per member, {count} members",
            "B",
            samples,
            paired_ratios(samples),
            higher_is_better=False,
            note="server RSS growth / members (VmRSS), rooms of 100",
        )
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--only", default="", help="scenarios containing WORD")
    opts = parser.parse_args()
    opts.rounds = opts.rounds or (3 if opts.quick else 5)
    opts.seconds = opts.seconds or (1.0 if opts.quick else 2.0)
    opts.warmup = 0.3 if opts.quick else 0.5
    opts.memory_rounds = 1 if opts.quick else 2
    limit = raise_nofile()
    members = min(10_000, limit - 500)
    if members < 10_000:
        print(f"bench chat: descriptor limit {limit}: memory test uses {members}")

    scenarios: list[tuple[str, Callable[[], list[Result]]]] = [
        (f"relay to {n} ", lambda n=n: relay(n, opts)) for n in (1, 100, 1000)
    ]
    scenarios.append((f"memory {members}", lambda: memory(members, opts)))
    failed = 0
    for name, run in scenarios:
        if opts.only and opts.only not in name:
            continue
        print(f"bench chat: {name} ...", flush=True)
        try:
            results = run()
        except Exception as e:  # one broken scenario should not stop the rest
            failed += 1
            print(f"bench chat: {name} failed: {e!r}", file=sys.stderr)
            continue
        for result in results:
            emit(result)
            ratios = result.ratios.get("asyncio") or [0.0]
            print(
                f"  {result.scenario}: sockd {result.median('sockd'):,.0f}, "
                f"asyncio {result.median('asyncio'):,.0f} {result.unit}; "
                f"ratio sockd/asyncio {statistics.median(ratios):.2f}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
