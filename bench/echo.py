"""
Echo benchmarks: twistd sockd-echo against stdlib asyncio, uvloop and a C
epoll server doing the same work, driven by the C load generator.

    python -m bench.echo [--quick] [--rounds N] [--seconds S] [--only WORD]

Scenarios: line request/response and pipelined (128 lines in flight) at 1,
100 and 1000 connections, raw pipelined, UDP (against, among others, a
uvloop echo doing sockd's per-datagram checks), and 10,000 idle connections
(accept time and memory per connection).  64-byte lines and datagrams.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from bench import (
    BIN,
    Result,
    Server,
    alternate,
    build_tools,
    emit,
    loadgen,
    paired_ratios,
    python_server,
    raise_nofile,
    sockd_daemon,
)

SIZE = 64
DEPTH = 128
#: the UDP limits the benchmark gives sockd, and the checking reference:
#: high enough never to drop, still evaluated for every datagram
UDP_RATE = 1_000_000_000
UDP_MAX_DATAGRAM = 8192

SOCKD_INI = """\
    [sockd]
    workers = {workers}

    [echo]
    listen = tcp:0:interface=127.0.0.1
    listen_udp = {udp}
    mode = {mode}
    max_connections = 30000
    max_connections_per_ip = 30000
    idle_timeout = 3600
    line_timeout = 3600
    udp_rate = {udp_rate}
    udp_burst = {udp_rate}
    udp_total_rate = {udp_rate}
    udp_max_datagram = {udp_max}
    udp_loop_budget = 0
"""

#: run in the daemon before twistd: echo through plain transport.write
NO_EAGER = (
    "import sockd.echo.protocol as e\n"
    "if hasattr(e, 'eager_write'):\n"
    "    e.eager_write = lambda transport, data: transport.write(data)"
)


#: run in the daemon before twistd: Twisted's own per-event dispatch
TWISTED_DISPATCH = (
    "import sockd.core.epoll as d\nd.lean_dispatch = lambda reactor: False"
)


def sockd_echo(
    name: str, mode: str, prelude: str = "", udp: bool = True, workers: int = 1
) -> Server:
    listen_udp = "udp:0:interface=127.0.0.1" if udp else ""
    ini = SOCKD_INI.format(
        mode=mode,
        udp=listen_udp,
        workers=workers,
        udp_rate=UDP_RATE,
        udp_max=UDP_MAX_DATAGRAM,
    )
    # With workers, ready once the last one serves.
    ready = rf"worker {workers - 1} \(pid \d+\) serving" if workers > 1 else None
    return sockd_daemon(name, "sockd-echo", ini, prelude, **_ready(ready))


def _ready(pattern: str | None) -> dict[str, str]:
    return {"ready": pattern} if pattern else {}


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


#: the checking reference's limits: those sockd runs with
UDP_CHECKS = [
    *("--rate", str(UDP_RATE), "--burst", str(UDP_RATE)),
    *("--total-rate", str(UDP_RATE), "--max-datagram", str(UDP_MAX_DATAGRAM)),
]

SERVERS: dict[str, Callable[[], Server]] = {
    "sockd line": lambda: sockd_echo("sockd line", "line"),
    "sockd line, no eager write": lambda: sockd_echo(
        "sockd line, no eager write", "line", NO_EAGER, udp=False
    ),
    "sockd raw": lambda: sockd_echo("sockd raw", "raw", udp=False),
    "sockd line, Twisted's dispatch": lambda: sockd_echo(
        "sockd line, Twisted's dispatch", "line", TWISTED_DISPATCH, udp=False
    ),
    "sockd line, 2 workers": lambda: sockd_echo(
        "sockd line, 2 workers", "line", workers=2
    ),
    "asyncio line": lambda: python_server("asyncio line", "bench.ref_echo_asyncio"),
    "asyncio raw": lambda: python_server(
        "asyncio raw", "bench.ref_echo_asyncio", "--raw"
    ),
    "uvloop line": lambda: python_server("uvloop line", "bench.ref_echo_uvloop"),
    "asyncio udp": lambda: python_server("asyncio udp", "bench.ref_udp_asyncio"),
    "uvloop udp": lambda: python_server(
        "uvloop udp", "bench.ref_udp_asyncio", "--uvloop"
    ),
    "uvloop udp, checks": lambda: python_server(
        "uvloop udp, checks",
        "bench.ref_udp_asyncio",
        "--uvloop",
        "--checks",
        *UDP_CHECKS,
    ),
    "C epoll": lambda: Server(
        "C epoll", [str(__import__("bench").BIN / "ref_echo_epoll"), "0", "0"], "tcp="
    ),
}


class Pool:
    """Servers started on first use and kept for the whole benchmark."""

    def __init__(self) -> None:
        self.running: dict[str, Server] = {}

    def get(self, name: str) -> Server:
        if name not in self.running:
            self.running[name] = SERVERS[name]().start()
        return self.running[name]

    def close(self) -> None:
        for server in self.running.values():
            server.stop()
        self.running.clear()


def measured(
    server: Server, cpu: dict[str, list[float]], run: Callable[[], dict[str, float]]
) -> float:
    """Run once; note the load generator's and the server's CPU share."""
    before, started = server.cpu(), time.monotonic()
    values = run()
    wall = time.monotonic() - started
    cpu.setdefault("loadgen", []).append(values.get("cpu", 0.0))
    cpu.setdefault(server.name, []).append((server.cpu() - before) / wall)
    if values.get("errors"):
        print(f"  {server.name}: {values['errors']:.0f} errors", file=sys.stderr)
    return values["rate"]


def cpu_note(cpu: dict[str, list[float]]) -> str:
    parts = [f"{name} {statistics.median(v):.2f}" for name, v in cpu.items()]
    return "CPU (cores, median): " + ", ".join(parts)


def throughput(
    pool: Pool,
    scenario: str,
    contenders: dict[str, str],
    kind: str,
    conns: int,
    depth: int,
    opts: argparse.Namespace,
    goals: dict[str, float] | None = None,
) -> list[Result]:
    """
    C{contenders}: label -> server name, the first labelled "sockd".  Each
    run drives one server for C{opts.seconds}.  Two results: answers a
    second, and answers per second of server CPU.
    """
    cpu: dict[str, list[float]] = {}
    runs: dict[str, Callable[[], float]] = {}
    for label, name in contenders.items():
        server = pool.get(name)
        port = server.ports[kind]

        def run(server: Server = server, port: int = port) -> float:
            return measured(
                server,
                cpu,
                lambda: loadgen(
                    kind, port, conns, SIZE, depth, opts.seconds, opts.warmup
                ),
            )

        runs[label] = run
    samples = alternate(opts.rounds, runs)
    unit = "datagrams/s" if kind == "udp" else "lines/s"
    # Per server CPU-second: the server's own cost, whatever share of the
    # (shared, busy) machine it was given in each run.
    efficiency = {
        label: [
            rate / share if share > 0 else 0.0
            for rate, share in zip(samples[label], cpu[name], strict=True)
        ]
        for label, name in contenders.items()
    }
    return [
        Result(
            "echo",
            scenario,
            unit,
            samples,
            paired_ratios(samples),
            goals=goals or {},
            note=cpu_note(cpu),
        ),
        Result(
            "echo",
            f"{scenario}, per server CPU-second",
            unit.replace("/s", "/CPU-s"),
            efficiency,
            paired_ratios(efficiency),
            note="answers / server CPU seconds",
        ),
    ]


@contextlib.contextmanager
def fresh(name: str) -> Iterator[Server]:
    server = SERVERS[name]().start()
    try:
        yield server
    finally:
        server.stop()


def idle(
    contenders: dict[str, str], count: int, opts: argparse.Namespace, suffix: str = ""
) -> list[Result]:
    """
    C{count} connections opened at once against a fresh server each round,
    sending nothing: seconds until the server holds every one (counted in
    its /proc/PID/fd), and its memory growth per connection.
    """
    seconds: dict[str, list[float]] = {label: [] for label in contenders}
    memory: dict[str, list[float]] = {label: [] for label in contenders}
    for _ in range(opts.idle_rounds):
        for label, name in contenders.items():
            with fresh(name) as server:
                took, per_conn = hold_idle(server, count)
            seconds[label].append(took)
            memory[label].append(per_conn)
    note = f"{count} connections at once, one empty line each; fresh server per run"
    return [
        Result(
            "echo",
            f"idle {count}{suffix}: accept all",
            "s",
            seconds,
            paired_ratios(seconds),
            higher_is_better=False,
            note=note,
            bound=1.0,
        ),
        Result(
            "echo",
            f"idle {count}{suffix}: memory/conn",
            "B",
            memory,
            paired_ratios(memory),
            higher_is_better=False,
            note="server RSS growth / connections",
            bound=2048,
        ),
    ]


def hold_idle(server: Server, count: int, limit: float = 60.0) -> tuple[float, float]:
    """Open C{count} idle connections: (seconds to accept all, bytes each)."""
    # Let start-up allocations settle before the baseline.
    time.sleep(0.3)
    base_rss, base_fds = server.rss(), server.open_fds()
    argv = [str(BIN / "loadgen"), "idle", "127.0.0.1", str(server.ports["tcp"])]
    argv += [str(count), str(SIZE), "1", str(limit)]
    started = time.monotonic()
    gen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        took = float("inf")
        fds = base_fds
        while time.monotonic() - started < limit:
            fds = server.open_fds()
            if fds >= base_fds + count:
                took = time.monotonic() - started
                break
            time.sleep(0.05)  # listing 10k descriptors costs: not too often
        rss = server.rss()
    finally:
        assert gen.stdin is not None and gen.stdout is not None
        gen.stdin.close()  # the load generator closes all and exits
        output = gen.stdout.read().decode(errors="replace").strip()
        gen.wait(30)
    if took == float("inf"):
        print(
            f"bench echo: {server.name}: {fds - base_fds} of {count} accepted "
            f"within {limit:.0f}s; load generator: {output!r}",
            file=sys.stderr,
        )
    return took, (rss - base_rss) / count


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
    opts.seconds = opts.seconds or (0.8 if opts.quick else 1.5)
    opts.warmup = 0.3 if opts.quick else 0.5
    opts.idle_rounds = 1 if opts.quick else 3

    build_tools()
    limit = raise_nofile()
    idle_count = min(10_000, limit - 200)
    if idle_count < 10_000:
        print(f"bench: descriptor limit {limit}: idle test uses {idle_count}")

    uv = uvloop_available()
    if not uv:
        print("bench: uvloop is not installed (pip install -e '.[bench]'): skipped")

    line = {"sockd": "sockd line", "asyncio": "asyncio line", "C epoll": "C epoll"}
    if uv:
        line["uvloop"] = "uvloop line"
    line_goals = {"asyncio": 1.0, "C epoll": 0.5}
    line_eager = {
        **line,
        "sockd, no eager write": "sockd line, no eager write",
        "sockd, Twisted's dispatch": "sockd line, Twisted's dispatch",
    }
    raw = {"sockd": "sockd raw", "asyncio": "asyncio raw", "C epoll": "C epoll"}
    udp = {"sockd": "sockd line", "asyncio": "asyncio udp", "C epoll": "C epoll"}
    if uv:
        udp["uvloop, checks"] = "uvloop udp, checks"
        udp["uvloop"] = "uvloop udp"
    # The goal is against the echo doing the same checks; plain beside it.
    udp_goals = {"uvloop, checks": 1.0} if uv else {}

    # name -> (contenders, kind, connections, lines in flight, goals)
    loads: dict[str, tuple[dict[str, str], str, int, int, dict[str, float]]] = {}
    for conns in (1, 100, 1000):
        who = line_eager if conns == 100 else line
        plural = "s" if conns > 1 else ""
        for depth, what in ((1, "request/response"), (DEPTH, f"pipelined {DEPTH}")):
            loads[f"line {what}, {conns} conn{plural}"] = (
                who,
                "tcp",
                conns,
                depth,
                line_goals,
            )
    loads[f"raw pipelined {DEPTH}, 100 conns"] = (raw, "tcp", 100, DEPTH, {})
    # [sockd] workers = 2 against one process: the gain from the second core
    # (which the load generator shares on a 2-core machine).
    two = {
        "sockd": "sockd line, 2 workers",
        "sockd, 1 process": "sockd line",
        "asyncio": "asyncio line",
    }
    gain = {"sockd, 1 process": 1.1}
    loads["line request/response, 100 conns, 2 workers"] = (two, "tcp", 100, 1, gain)
    loads[f"line pipelined {DEPTH}, 100 conns, 2 workers"] = (
        two,
        "tcp",
        100,
        DEPTH,
        gain,
    )
    # 128 datagrams in flight: more overflows the receive buffers and the
    # run measures loss and re-sending instead.
    loads["udp 64 B, 16 sockets x 8"] = (udp, "udp", 16, 8, udp_goals)
    udp_two = {
        "sockd": "sockd line, 2 workers",
        "sockd, 1 process": "sockd line",
        **({"uvloop": "uvloop udp"} if uv else {}),
    }
    # No goal: on 2 cores the load generator takes most of the second one.
    loads["udp 64 B, 16 sockets x 8, 2 workers"] = (udp_two, "udp", 16, 8, {})

    pool = Pool()

    def load(name: str) -> Callable[[], list[Result]]:
        who, kind, conns, depth, goals = loads[name]
        return lambda: throughput(pool, name, who, kind, conns, depth, opts, goals)

    scenarios = [(name, load(name)) for name in loads]
    idle_who = {"sockd": "sockd line", "asyncio": "asyncio line", "C epoll": "C epoll"}
    scenarios.append((f"idle {idle_count}", lambda: idle(idle_who, idle_count, opts)))
    idle_two = {"sockd": "sockd line, 2 workers", "sockd, 1 process": "sockd line"}
    scenarios.append(
        (
            f"idle {idle_count}, 2 workers",
            lambda: idle(idle_two, idle_count, opts, " (2 workers)"),
        )
    )

    failed = 0
    try:
        for name, run in scenarios:
            if opts.only and opts.only not in name:
                continue
            print(f"bench echo: {name} ...", flush=True)
            try:
                for result in run():
                    emit(result)
            except Exception as e:  # one broken scenario should not stop the rest
                failed += 1
                print(f"bench echo: {name} failed: {e}", file=sys.stderr)
    finally:
        pool.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
