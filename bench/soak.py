"""
Soak: one C{twistd sockd-echo} under repeated cycles of mixed load, checking
that it gives back what it takes.

    python -m bench.soak [--minutes M] [--workers N]

Each cycle: request/response and pipelined line echo at 100 connections,
UDP echo, then 2,000 idle connections opened and closed.  After each cycle
the daemon's descriptors must return to their baseline and every answer must
have been right; at the end its memory must not have kept growing after the
first cycle.  Exits 1 if any of that fails.  Bounded by --minutes.  With
--workers N the daemon runs N processes (C{[sockd] workers}); descriptors
and memory are then summed over them.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import Server, build_tools, loadgen, raise_nofile
from bench.echo import hold_idle, sockd_echo

MiB = 1024 * 1024


def settle(server: Server, baseline: int, timeout: float = 15.0) -> int:
    """Wait for the daemon's descriptors to return to C{baseline}."""
    deadline = time.monotonic() + timeout
    fds = server.open_fds()
    while fds > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
        fds = server.open_fds()
    return fds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    build_tools()
    raise_nofile()
    server = sockd_echo("sockd line", "line", workers=args.workers).start()
    problems: list[str] = []
    rss: list[int] = []
    try:
        time.sleep(0.3)
        baseline = server.open_fds()
        tcp, udp = server.ports["tcp"], server.ports["udp"]
        end = time.monotonic() + args.minutes * 60
        cycle = 0
        while time.monotonic() < end and cycle < 1000:
            cycle += 1
            runs = {
                "request/response": loadgen("tcp", tcp, 100, 64, 1, 3.0),
                "pipelined": loadgen("tcp", tcp, 100, 64, 128, 3.0),
                "udp": loadgen("udp", udp, 16, 64, 8, 3.0),
            }
            for name, values in runs.items():
                if values.get("errors"):
                    problems.append(f"cycle {cycle}: {name}: wrong answers")
            took, _ = hold_idle(server, 2000, 30.0)
            if took == float("inf"):
                problems.append(f"cycle {cycle}: idle connections not all accepted")
            fds = settle(server, baseline)
            if fds > baseline:
                problems.append(f"cycle {cycle}: {fds - baseline} descriptors left")
            rss.append(server.rss())
            rates = ", ".join(f"{k} {v['rate']:.0f}/s" for k, v in runs.items())
            print(
                f"soak: cycle {cycle}: {rates}; RSS {rss[-1] / MiB:.1f} MiB, "
                f"descriptors {fds} (baseline {baseline})",
                flush=True,
            )
    finally:
        server.stop()
    # The first cycle warms caches and allocator pools; after it, memory
    # should stay flat.
    if len(rss) >= 3 and rss[-1] > rss[0] * 1.2 + 8 * MiB:
        problems.append(
            f"memory grew from {rss[0] / MiB:.1f} to {rss[-1] / MiB:.1f} MiB"
        )
    for problem in problems:
        print(f"soak: FAILED: {problem}", file=sys.stderr)
    if not problems:
        print(f"soak: ok: {len(rss)} cycles, memory and descriptors flat")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
