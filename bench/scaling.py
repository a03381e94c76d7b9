"""
Scaling rows: throughput, p50 and p99 latency, server CPU per unit of work
and server memory as the load grows, sockd beside the best references.

    python -m bench.scaling [--quick] [--rounds N] [--seconds S]
                            [--only WORD] [--max-load N]

Series and loads:

  echo request/response, echo pipelined 128 (64-byte lines, line mode)
      1, 10, 100, 1,000 and 10,000 connections; sockd, uvloop (stdlib
      asyncio when uvloop is not installed) and C epoll.
  file downloads (a 1 MiB file, downloaded again and again)
      1, 10, 100 and 1,000 concurrent streams; sockd and nginx with
      tcp_nopush on and off.
  chat relay (one member talks, the others of its room receive)
      10, 100, 1,000 and 10,000 members; sockd and the asyncio relay.

Latency: echo, from sending a line to reading its whole answer; downloads,
from connect() to the server's close (both measured by the C load
generator); chat, from sending a timestamped message until the whole room
has it (the member that joined last, the last one the relay sends to,
received it; at most 8 messages in flight, 2 from 1,000 members on).
Server CPU per unit: the server's CPU time over the run divided by the
work done (lines, MB, datagrams relayed).  RSS: the server's resident
memory, the peak of samples taken every 0.1 s during the run (chat: after
it).

Each row prints five RESULT lines (throughput, p50, p99, cpu, rss) with
sockd's ratio to each reference, for python -m bench's table, charts and
--compare.  Short runs: the whole set takes about 6 minutes (--quick: 3).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator

from bench import (
    METRICS,
    Result,
    Server,
    build_tools,
    emit,
    loadgen,
    percentile,
    raise_nofile,
    sockd_daemon,
)

MIB = 1024 * 1024
ECHO_LOADS = [1, 10, 100, 1000, 10_000]
FILE_LOADS = [1, 10, 100, 1000]
CHAT_LOADS = [10, 100, 1000, 10_000]
FILE_NAME = "scaling.bin"


FILE_INI = """\
    [file]
    listen = tcp:0:interface=127.0.0.1
    root = {root}
    max_connections = 30000
    max_connections_per_ip = 30000
"""

#: one run: metric -> value
Run = Callable[[], dict[str, float]]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def finite_ratios(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    """sockd/reference per round, where both are finite and the reference not 0."""
    mine = samples["sockd"]
    return {
        name: [
            a / b
            for a, b in zip(mine, theirs, strict=False)
            if b and math.isfinite(a) and math.isfinite(b)
        ]
        for name, theirs in samples.items()
        if name != "sockd"
    }


def measure(
    series: str,
    load: int,
    noun: str,
    units: dict[str, str],
    runs: dict[str, Run],
    rounds: int,
) -> list[Result]:
    """Run the contenders alternately; one result per metric."""
    samples = {metric: {label: [] for label in runs} for metric in METRICS}
    for _ in range(rounds):
        for label, run in runs.items():
            values = run()
            for metric in METRICS:
                samples[metric][label].append(values.get(metric, math.inf))
    where = f"{series}, {plural(load, noun)}"
    return [
        Result(
            "scaling",
            f"{where}: {label}",
            units[metric],
            samples[metric],
            finite_ratios(samples[metric]),
            higher_is_better=higher,
            series=series,
            load=load,
            metric=metric,
        )
        for metric, (label, higher) in METRICS.items()
    ]


def run_on(
    server: Server, drive: Callable[[], dict[str, float]], per: float, conns: int
) -> dict[str, float]:
    """
    Drive C{server} once: the load generator's figures as metrics.
    C{per} scales its rate to the unit of work (1e-6 for MB from bytes).
    """
    descriptors = server.open_fds() if conns >= SETTLE_FROM else 0
    before, started = server.cpu(), time.monotonic()
    with server.peak_rss() as rss:
        values = drive()
    share = (server.cpu() - before) / (time.monotonic() - started)
    if descriptors:
        settle(server, descriptors)
    if values.get("errors"):
        print(f"  {server.name}: {values['errors']:.0f} errors", file=sys.stderr)
    rate = values["rate"] * per
    return {
        "throughput": rate,
        "p50": values.get("p50_us", math.inf) / 1e3,
        "p99": values.get("p99_us", math.inf) / 1e3,
        "cpu": share / rate * 1e6 if rate > 0 else math.inf,
        "rss": rss.peak / MIB,
    }


#: from this many connections on, wait for the server to close them all
#: before the next run, which would otherwise find its listen queue full
SETTLE_FROM = 1000


def settle(server: Server, descriptors: int, limit: float = 20.0) -> None:
    """Wait (at most C{limit} s) until C{server} is back to C{descriptors}."""
    deadline = time.monotonic() + limit
    while server.open_fds() > descriptors + 16:
        if time.monotonic() > deadline:
            print(f"  {server.name}: still closing connections after {limit:.0f}s")
            return
        time.sleep(0.1)  # polling another process's descriptor table


def echo_rows(opts: argparse.Namespace) -> Iterator[list[Result]]:
    from bench.echo import DEPTH, SIZE, Pool, uvloop_available

    who = {"sockd": "sockd line"}
    if uvloop_available():
        who["uvloop"] = "uvloop line"
    else:
        print("bench scaling: uvloop is not installed: asyncio instead")
        who["asyncio"] = "asyncio line"
    who["C epoll"] = "C epoll"
    units = {"throughput": "lines/s", "cpu": "CPU-us/line"}
    pool = Pool()
    try:
        for depth, series in (
            (1, "echo request/response"),
            (DEPTH, f"echo pipelined {DEPTH}"),
        ):
            for conns in opts.loads(ECHO_LOADS, series):

                def drive(
                    server: Server, conns: int = conns, depth: int = depth
                ) -> Run:
                    port = server.ports["tcp"]
                    return lambda: run_on(
                        server,
                        lambda: loadgen(
                            "tcp", port, conns, SIZE, depth, opts.seconds, opts.warmup
                        ),
                        1.0,
                        conns,
                    )

                runs = {label: drive(pool.get(name)) for label, name in who.items()}
                yield measure(
                    series, conns, "conn", {**UNITS, **units}, runs, opts.rounds
                )
    finally:
        pool.close()


def file_rows(opts: argparse.Namespace) -> Iterator[list[Result]]:
    import shutil
    from pathlib import Path

    from bench.files import NGINX_OFF, NGINX_ON, Nginx, loadgen_raw, make_root

    series = "file downloads, 1 MiB"
    loads = opts.loads(FILE_LOADS, series)
    if not loads:
        return
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        print("bench scaling: nginx is not installed: file rows skipped")
        return
    root = make_root([(FILE_NAME, MIB, 0, 0.0)])
    servers = {
        "sockd": sockd_daemon("sockd file", "sockd-file", FILE_INI.format(root=root)),
        NGINX_ON: Nginx(root),
        NGINX_OFF: Nginx(root, nopush=False),
    }
    get = f"GET /{FILE_NAME} HTTP/1.0\\r\\n\\r\\n"
    requests = {"sockd": f"{FILE_NAME}\\n", NGINX_ON: get, NGINX_OFF: get}
    units = {"throughput": "MB/s", "cpu": "CPU-us/MB"}
    try:
        for server in servers.values():
            server.start()
        for streams in loads:

            def drive(label: str, streams: int = streams) -> Run:
                server = servers[label]
                args = ["fetch", "127.0.0.1", str(server.ports["tcp"])]
                args += [str(streams), requests[label]]
                # Long enough for every stream to finish a few downloads.
                seconds = max(opts.seconds, streams / 400)
                args += [str(seconds), str(opts.warmup)]
                timeout = seconds + opts.warmup + 30
                return lambda: run_on(
                    server, lambda: loadgen_raw(args, timeout), 1e-6, streams
                )

            runs = {label: drive(label) for label in servers}
            yield measure(
                series, streams, "stream", {**UNITS, **units}, runs, opts.rounds
            )
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def chat_window(members: int) -> int:
    """
    Chat messages in flight (sent, not yet delivered to the whole room): 8,
    fewer in large rooms, where one message is already many datagrams.
    """
    return max(2, min(8, 1000 // members))


def chat_rows(opts: argparse.Namespace) -> Iterator[list[Result]]:
    from bench.chat import Room, member_socket

    series = "chat relay"
    loads = opts.loads(CHAT_LOADS, series)
    if not loads:
        return
    units = {"throughput": "datagrams/s", "cpu": "CPU-us/datagram"}
    rooms: dict[str, Room] = {}
    try:
        for name in ("sockd", "asyncio"):
            rooms[name] = Room(name, 0)
        members = 0
        for load in loads:
            # One room grows from load to load; both servers share the
            # members, each run connecting them to its server.
            started = time.monotonic()
            joining = [member_socket() for _ in range(load - members)]
            for room in rooms.values():
                room.admit(joining)
            members = load
            print(
                f"  {load} members joined in {time.monotonic() - started:.1f}s",
                flush=True,
            )

            def drive(room: Room, room_size: int = load) -> Run:
                def run() -> dict[str, float]:
                    latencies: list[float] = []
                    rate, cpu = room.run_window(
                        opts.seconds, opts.warmup, chat_window(room_size), latencies
                    )
                    return {
                        "throughput": rate,
                        "p50": percentile(latencies, 0.50) * 1e3,
                        "p99": percentile(latencies, 0.99) * 1e3,
                        "cpu": cpu * 1e6,
                        "rss": room.server.rss() / MIB,
                    }

                return run

            runs = {name: drive(room) for name, room in rooms.items()}
            yield measure(series, load, "member", {**UNITS, **units}, runs, opts.rounds)
    finally:
        for room in rooms.values():
            room.close()


#: units every series shares
UNITS = {"p50": "ms", "p99": "ms", "rss": "MiB"}

SERIES: dict[str, Callable[[argparse.Namespace], Iterator[list[Result]]]] = {
    "echo": echo_rows,
    "files": file_rows,
    "chat": chat_rows,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--rounds", type=int, default=None, help="runs each")
    parser.add_argument("--seconds", type=float, default=None, help="per run")
    parser.add_argument(
        "--only", default="", help="rows whose series or load contains WORD"
    )
    parser.add_argument(
        "--max-load", type=int, default=0, help="skip loads above N (a smoke test)"
    )
    opts = parser.parse_args()
    opts.rounds = opts.rounds or (2 if opts.quick else 3)
    opts.seconds = opts.seconds or (0.5 if opts.quick else 1.0)
    opts.warmup = 0.3 if opts.quick else 0.5

    build_tools()
    limit = raise_nofile()
    # Headroom for the servers' and the harness's own descriptors.
    most = limit - 300

    def loads(wanted: list[int], series: str) -> list[int]:
        chosen = []
        for load in wanted:
            if opts.max_load and load > opts.max_load:
                continue
            if opts.only and opts.only not in f"{series}, {load}":
                continue
            if load > most:
                print(f"bench scaling: descriptor limit {limit}: {series} at {most}")
                load = most
            chosen.append(load)
        return chosen

    opts.loads = loads
    failed = 0
    for name, rows in SERIES.items():
        began = time.monotonic()
        print(f"bench scaling: {name} ...", flush=True)
        try:
            for results in rows(opts):
                for result in results:
                    emit(result)
                throughput = results[0]
                print(
                    f"  {throughput.scenario}: "
                    + ", ".join(
                        f"{who} {statistics.median(v):,.0f}"
                        for who, v in throughput.samples.items()
                    )
                    + f" {throughput.unit}",
                    flush=True,
                )
        except Exception as e:  # one broken series should not stop the rest
            failed += 1
            print(f"bench scaling: {name} failed: {e!r}", file=sys.stderr)
        print(f"bench scaling: {name} took {time.monotonic() - began:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
