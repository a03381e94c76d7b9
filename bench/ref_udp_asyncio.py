"""
Reference: UDP echo on stdlib asyncio (or, with --uvloop, on uvloop): each
datagram back to its sender, upper-cased.

    python -m bench.ref_udp_asyncio [--uvloop] [--port N]

Prints "listening udp=PORT" once bound (127.0.0.1 only); with --uvloop and
no uvloop installed, exits with status 3.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data.upper(), addr)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        DatagramEcho, local_addr=("127.0.0.1", port)
    )
    print(f"listening udp={transport.get_extra_info('sockname')[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print("uvloop is not installed: pip install -e '.[bench]'", file=sys.stderr)
            sys.exit(3)
        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
