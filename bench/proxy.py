"""
The cost of the PROXY protocol wrapper (C{haproxy:} listeners): the same
daemon, once behind a C{haproxy:} listener and once on a plain C{tcp:} one,
driven by the C load generator, which sends a PROXY v2 header itself at the
start of every connection (C{LOADGEN_PROXY=v2}) as a load balancer would;
no HAProxy runs.  Echo: line request/response at 100 connections.  Files:
one 1 GiB download (and, without C{--quick}, 100 concurrent 10 MiB ones),
beside "sockd, chunk producer": the C{haproxy:} daemon with sendfile not
reaching under the wrapper, as it was before.

    python -m bench.proxy [--quick] [--rounds N] [--seconds S]

The ratio sockd/"sockd, direct" is what the wrapper costs (1.0: nothing).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

from bench import (
    BIN,
    Result,
    Server,
    alternate,
    build_tools,
    emit,
    paired_ratios,
    parse_loadgen,
    raise_nofile,
    sockd_daemon,
)
from bench.echo import SOCKD_INI, UDP_MAX_DATAGRAM, UDP_RATE, cpu_note
from bench.files import SCENARIOS, label, make_root

#: the header the load generator sends: HAProxy's C{send-proxy-v2}
VERSION = "v2"
#: the load generator's address: a trusted proxy
TRUSTED = "127.0.0.1/32"
#: run in the daemon before twistd: file bodies behind the wrapper through
#: the chunk producer, as before sendfile reached under it
NO_UNWRAP = "import sockd.files.sendfile as s\ns.unwrap = lambda transport: transport"


def behind(ini: str) -> str:
    """C{ini} with its C{tcp:} listener behind C{haproxy:}, trusting loopback."""
    ini = ini.replace("listen = tcp:", "listen = haproxy:tcp:")
    return re.sub(
        r"^( *)\[sockd\]\n",
        rf"\g<0>\1trusted_proxies = {TRUSTED}\n",
        ini,
        count=1,
        flags=re.M,
    )


def run_loadgen(
    args: list[str], server: Server, proxied: bool, timeout: float
) -> dict[str, float]:
    """The load generator against C{server}, sending PROXY headers if C{proxied}."""
    env = dict(os.environ)
    env.pop("LOADGEN_PROXY", None)
    if proxied:
        env["LOADGEN_PROXY"] = VERSION
    argv = [str(BIN / "loadgen"), args[0], "127.0.0.1", str(server.ports["tcp"])]
    done = subprocess.run(
        [*argv, *args[1:]], capture_output=True, text=True, timeout=timeout, env=env
    )
    values = parse_loadgen(done.stdout, done.stderr)
    if values.get("errors"):
        raise RuntimeError(f"loadgen: {server.name}: errors: {done.stdout}")
    return values


def measure(
    contenders: dict[str, tuple[Server, bool]],
    args: list[str],
    rounds: int,
    timeout: float,
    scale: float,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """
    Alternate the contenders; per contender the rates (divided by
    C{scale}), the rates per server CPU-second, and the CPU shares.
    """
    per_cpu: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def runner(name: str, server: Server, proxied: bool) -> float:
        def run() -> float:
            before, started = server.cpu(), time.monotonic()
            values = run_loadgen(args, server, proxied, timeout)
            wall = time.monotonic() - started
            used = server.cpu() - before
            cpu.setdefault(name, []).append(used / wall)
            cpu.setdefault("loadgen", []).append(values.get("cpu", 0.0))
            rate = values["rate"] / scale
            per_cpu.setdefault(name, []).append(rate * wall / used if used else 0.0)
            return rate

        return run

    samples = alternate(
        rounds, {name: runner(name, *who) for name, who in contenders.items()}
    )
    return samples, per_cpu, cpu


def echo(rounds: int, seconds: float, warmup: float) -> None:
    ini = SOCKD_INI.format(
        mode="line", udp="", workers=1, udp_rate=UDP_RATE, udp_max=UDP_MAX_DATAGRAM
    )
    proxied = sockd_daemon("sockd echo, haproxy:", "sockd-echo", behind(ini)).start()
    direct = sockd_daemon("sockd echo", "sockd-echo", ini)
    try:
        direct.start()
        args = ["tcp", "100", "64", "1", str(seconds), str(warmup)]
        samples, per_cpu, cpu = measure(
            {"sockd": (proxied, True), "sockd, direct": (direct, False)},
            args,
            rounds,
            seconds + warmup + 30,
            1.0,
        )
    finally:
        proxied.stop()
        direct.stop()
    scenario = f"line request/response, 100 conns, haproxy: (PROXY {VERSION})"
    emit(
        Result(
            "proxy",
            scenario,
            "lines/s",
            samples,
            paired_ratios(samples),
            note=cpu_note(cpu),
        )
    )
    emit(
        Result(
            "proxy",
            f"{scenario}, per server CPU-second",
            "lines/CPU-s",
            per_cpu,
            paired_ratios(per_cpu),
            note="answers / server CPU seconds",
        )
    )


def files(rounds: int, seconds: float, quick: bool) -> None:
    scenarios = SCENARIOS[:1] if quick else SCENARIOS
    root = make_root(scenarios)
    ini = f"""\
        [sockd]

        [file]
        listen = tcp:0:interface=127.0.0.1
        root = {root}
        max_connections = 1000
        max_connections_per_ip = 1000
    """
    proxied = sockd_daemon("sockd file, haproxy:", "sockd-file", behind(ini))
    direct = sockd_daemon("sockd file", "sockd-file", ini)
    chunks = sockd_daemon(
        "sockd file, haproxy:, chunks", "sockd-file", behind(ini), NO_UNWRAP
    )
    try:
        for server in (proxied, direct, chunks):
            server.start()
        for name, size, conns, _ in scenarios:
            args = ["fetch", str(conns), f"{name}\\n", str(seconds), "0.5"]
            samples, per_cpu, cpu = measure(
                {
                    "sockd": (proxied, True),
                    "sockd, direct": (direct, False),
                    "sockd, chunk producer": (chunks, True),
                },
                args,
                rounds,
                seconds + 30,
                1e6,
            )
            scenario = f"{label(size, conns)}, haproxy: (PROXY {VERSION})"
            emit(
                Result(
                    "proxy",
                    scenario,
                    "MB/s",
                    samples,
                    paired_ratios(samples),
                    note=cpu_note(cpu),
                )
            )
            emit(
                Result(
                    "proxy",
                    f"{scenario}, per server CPU-second",
                    "MB/CPU-s",
                    per_cpu,
                    paired_ratios(per_cpu),
                    note="MB / server CPU seconds",
                )
            )
    finally:
        for server in (proxied, direct, chunks):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    opts = parser.parse_args()
    rounds = opts.rounds or (3 if opts.quick else 5)
    build_tools()
    raise_nofile()
    echo(
        rounds, opts.seconds or (0.8 if opts.quick else 1.5), 0.3 if opts.quick else 0.5
    )
    files(rounds, opts.seconds or (1.0 if opts.quick else 2.0), opts.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
