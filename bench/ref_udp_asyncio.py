"""
Reference: UDP echo on stdlib asyncio (or, with --uvloop, on uvloop): each
datagram back to its sender, upper-cased.

    python -m bench.ref_udp_asyncio [--uvloop] [--checks] [--port N]
        [--rate R] [--burst B] [--total-rate T] [--max-datagram N]

--checks does per datagram the checks sockd's UDP echo does before it
answers: drop a datagram from source port 0 or from a port that would
bounce answers back (echo, discard, daytime, qotd, chargen, time, DNS,
NTP), drop one longer than --max-datagram bytes, and charge a token bucket
kept per source address (at most 65,536 sources, the least recently seen
forgotten first) and a global one; --rate, --burst and --total-rate are
their parameters, as in sockd's [echo] udp_rate, udp_burst and
udp_total_rate.

Prints "listening udp=PORT" once bound (127.0.0.1 only); with --uvloop and
no uvloop installed, exits with status 3.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

#: source ports never answered (the same set as sockd's echo)
LOOP_PORTS = frozenset(
    {0, 7, 9, 13, 17, 19, 37, 53, 69, 111, 123, 137, 138, 161, 162, 389, 520}
    | {1194, 1900, 3283, 3702, 5353, 5355, 5683, 8001, 9001, 10001, 11211, 27015}
)
#: as sockd's echo: every privileged port too, unless configured otherwise
BLOCKED_PORTS = LOOP_PORTS | frozenset(range(1024))
MAX_SOURCES = 65536


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data.upper(), addr)


class CheckedEcho(DatagramEcho):
    """The echo with sockd's per-datagram checks in front of it."""

    def __init__(
        self,
        rate: float,
        burst: float,
        total_rate: float,
        max_datagram: int,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.total_rate = total_rate
        self.total_burst = max(total_rate, burst)
        self.max_datagram = max_datagram
        self.clock = clock or asyncio.get_running_loop().time
        self.sources: OrderedDict[str, list[float]] = OrderedDict()
        self.total = [self.total_burst, self.clock()]
        self.dropped = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if addr[1] in BLOCKED_PORTS or len(data) > self.max_datagram:
            self.dropped += 1
            return
        if not self.allow(addr[0]):
            self.dropped += 1
            return
        try:
            self.transport.sendto(data.upper(), addr)
        except OSError:
            self.dropped += 1

    def allow(self, host: str) -> bool:
        """Take a token from the source's bucket and from the global one."""
        now = self.clock()
        state = self.sources.get(host)
        if state is None:
            if len(self.sources) >= MAX_SOURCES:
                self.sources.popitem(last=False)
            state = self.sources[host] = [self.burst, now]
        else:
            self.sources.move_to_end(host)
        tokens = min(self.burst, state[0] + (now - state[1]) * self.rate)
        state[1] = now
        if tokens < 1 or not self.take_total(now):
            state[0] = tokens
            return False
        state[0] = tokens - 1
        return True

    def take_total(self, now: float) -> bool:
        total = self.total
        tokens = min(self.total_burst, total[0] + (now - total[1]) * self.total_rate)
        total[1] = now
        if tokens < 1:
            total[0] = tokens
            return False
        total[0] = tokens - 1
        return True


async def serve(port: int, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()

    def protocol() -> DatagramEcho:
        if args.checks:
            return CheckedEcho(
                args.rate, args.burst, args.total_rate, args.max_datagram
            )
        return DatagramEcho()

    transport, _ = await loop.create_datagram_endpoint(
        protocol, local_addr=("127.0.0.1", port)
    )
    print(f"listening udp={transport.get_extra_info('sockname')[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--checks", action="store_true", help="sockd's checks too")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=100.0, help="per source, /s")
    parser.add_argument("--burst", type=float, default=200.0, help="per source")
    parser.add_argument("--total-rate", type=float, default=50000.0, help="/s")
    parser.add_argument("--max-datagram", type=int, default=8192, help="bytes")
    args = parser.parse_args()
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print("uvloop is not installed: pip install -e '.[bench]'", file=sys.stderr)
            sys.exit(3)
        uvloop.run(serve(args.port, args))
    else:
        asyncio.run(serve(args.port, args))


if __name__ == "__main__":
    main()
