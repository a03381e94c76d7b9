"""
Reference: a minimal UDP chat relay on stdlib asyncio, doing the work the
benchmark measures in sockd-chat: a client is its address, its first
datagram joins it to the lobby with a guest nickname, C{/join ROOM} moves
it, and plain text goes to the other members of its room as
C{<nick> text}.  No validation, limits or safety: a yardstick only.

    python -m bench.ref_chat_asyncio [--port N]

Prints "listening udp=PORT" once bound (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


class Relay(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.nicks: dict[Any, str] = {}
        self.where: dict[Any, str] = {}
        self.rooms: dict[str, dict[Any, str]] = {"lobby": {}}
        self.guests = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        nick = self.nicks.get(addr)
        if nick is None:
            self.guests += 1
            nick = self.nicks[addr] = f"guest-{self.guests}"
            self.where[addr] = "lobby"
            self.rooms["lobby"][addr] = nick
            self.transport.sendto(f"*** welcome, you are {nick}.\n".encode(), addr)
            return
        text = data.decode("utf-8", "replace").rstrip("\r\n")
        if text.startswith("/join "):
            name = text[6:].strip().lower()
            del self.rooms[self.where[addr]][addr]
            self.rooms.setdefault(name, {})[addr] = nick
            self.where[addr] = name
            self.transport.sendto(f"*** you joined #{name}\n".encode(), addr)
            return
        line = f"<{nick}> {text}\n".encode()
        sendto = self.transport.sendto
        for other in self.rooms[self.where[addr]]:
            if other != addr:
                sendto(line, other)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        Relay, local_addr=("127.0.0.1", port)
    )
    print(f"listening udp={transport.get_extra_info('sockname')[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
