"""
A private redis-server on 127.0.0.1 for the chat federation benchmark and
its integration tests (no persistence, a temporary directory, any port).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["RedisServer", "free_port", "read_reply"]


def free_port() -> int:
    """A loopback TCP port nobody listens on now (redis refuses --port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """redis-server on 127.0.0.1, no persistence, in a temporary directory."""

    #: the program run, found on the PATH
    program = "redis-server"
    #: what it logs once it serves
    ready = b"Ready to accept connections"

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.extra = list(extra)
        binary = shutil.which(self.program)
        if binary is None:
            raise FileNotFoundError(
                f"{self.program} is not installed (apt-get install {self.program})"
            )
        self.binary = binary
        self.port = port or free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="sockd-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.password = None
        if "--requirepass" in extra:
            self.password = extra[extra.index("--requirepass") + 1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--loglevel",
            "notice",
            *self.extra,
        ]

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(
            self.argv(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            bufsize=0,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if not ready:
                continue
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            if self.ready in seen:
                return self
        self.stop()
        raise AssertionError(f"{self.binary} did not start:\n" + seen.decode())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def command(self, *words: str) -> Any:
        """
        One command (after AUTH if it has a password) and its reply, for
        checks from a test: see L{read_reply}.
        """
        commands = [("AUTH", self.password)] if self.password else []
        commands.append(words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            data = b""
            for command in commands:
                data += b"*%d\r\n" % len(command)
                for word in command:
                    raw = word.encode()
                    data += b"$%d\r\n%s\r\n" % (len(raw), raw)
            sock.sendall(data)
            with sock.makefile("rb") as reader:
                for _ in commands[1:]:
                    read_reply(reader)
                return read_reply(reader)


def read_reply(reader: Any) -> Any:
    """A bulk string as bytes (or None), an array as a list, else the line."""
    line: bytes = reader.readline()
    if line[:1] == b"$":
        size = int(line[1:])
        return None if size < 0 else reader.read(size + 2)[:-2]
    if line[:1] == b"*":
        size = int(line[1:])
        return None if size < 0 else [read_reply(reader) for _ in range(size)]
    return line
