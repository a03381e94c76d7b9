"""
Reference: the echo sockd serves, on stdlib asyncio.  Line mode splits each
read at its last newline, upper-cases the whole lines and writes them once,
carrying the partial line over; raw mode upper-cases each chunk.  Writes
pause reading while the transport's buffer is full, as sockd's backpressure
does.

    python -m bench.ref_echo_asyncio [--raw] [--port N]

Prints "listening tcp=PORT" once bound (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


class LineEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
        end = data.rfind(b"\n") + 1
        if end:
            self.buffer = data[end:]
            self.transport.write(data[:end].upper())
        else:
            self.buffer = data

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class RawEcho(LineEcho):
    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


async def serve(raw: bool, port: int) -> None:
    loop = asyncio.get_running_loop()
    # The same listen queue as sockd's default backlog.
    server = await loop.create_server(
        RawEcho if raw else LineEcho, "127.0.0.1", port, backlog=4096
    )
    print(f"listening tcp={server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main(uvloop: bool = False) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if uvloop:
        import uvloop as _uvloop

        _uvloop.run(serve(args.raw, args.port))
    else:
        asyncio.run(serve(args.raw, args.port))


if __name__ == "__main__":
    main()
