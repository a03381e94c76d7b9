"""
Shared test helpers: in-memory transports, settings builders, and a real
C{twistd} runner for integration tests (loopback only, ephemeral ports).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransportWithDisconnection

import sockd.core.config as config

ROOT = Path(__file__).resolve().parent.parent

#: twistd as this interpreter runs it (``python -m twisted`` is "twist", not twistd)
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]


class FakeDatagramTransport:
    """Records datagrams written; can be told to fail like sendto does."""

    def __init__(self, error: OSError | None = None) -> None:
        self.written: list[tuple[bytes, Any]] = []
        self.error = error

    def write(self, data: bytes, addr: Any = None) -> None:
        if self.error is not None:
            raise self.error
        self.written.append((data, addr))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 9)


def settings(text: str = "", **sections: dict[str, str]) -> config.Config:
    """Parse INI text (dedented), with per-section overrides as keywords."""
    return config.parse(textwrap.dedent(text), "<test>", ROOT, sections)


def connect(
    factory: Any, host: str = "127.0.0.1", port: int = 40000
) -> tuple[Any, StringTransportWithDisconnection]:
    """Build a protocol from C{factory} on an in-memory transport."""
    addr = IPv4Address("TCP", host, port)
    protocol = factory.buildProtocol(addr)
    transport = StringTransportWithDisconnection(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 9000), peerAddress=addr
    )
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def need(tool: str) -> str:
    """The path of a command-line tool, or skip the test saying which."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it with apt-get)")
    return path


def free_port_pair() -> int:
    """A port number free for both TCP and UDP on 127.0.0.1."""
    for _ in range(20):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both TCP and UDP")


def socket_activation(sockets: Sequence[tuple[str, str]], name: str) -> list[str]:
    """
    The command prefix that passes C{sockets} ("stream" or "datagram",
    HOST:PORT), in order, as a .socket unit listing them would:
    C{systemd-socket-activate} once per socket, nested (one of them binds
    one kind only), the last naming them all (Twisted's C{systemd:}
    endpoint wants C{LISTEN_FDNAMES}).  The command starts on the first
    connection or datagram to any of them.
    """
    activate = need("systemd-socket-activate")
    wrapper: list[str] = []
    for number, (kind, address) in enumerate(sockets, 1):
        wrapper.append(activate)
        if kind == "datagram":
            wrapper.append("--datagram")
        if number == len(sockets):
            wrapper.append("--fdname=" + ":".join([name] * len(sockets)))
        wrapper += ["-l", address, "--"]
    return wrapper


class Daemon:
    """
    A real C{twistd -n} on loopback.  Listeners bind port 0; the daemon's log
    says which ports it got, and C{sockd: ready} once every one is bound.
    """

    READY = re.compile(r"sockd: ready")
    LISTEN = re.compile(r"\] (\w+): listening on (TCP|UDP|UNIX) (\S+)")

    def __init__(
        self,
        tapname: str,
        ini: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        directory: Path | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.tapname = tapname
        self.wrapper = list(wrapper)
        self.directory = Path(directory or tempfile.mkdtemp(prefix="sockd-test-"))
        self.config_path = self.directory / "sockd.ini"
        self.config_path.write_text(textwrap.dedent(ini))
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.ports: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.process: subprocess.Popen[str] | None = None
        self._changed = threading.Condition()
        self._eof = False

    def command(self) -> list[str]:
        return [
            *self.wrapper,
            *TWISTD,
            "--nodaemon",
            "--pidfile=",
            "--logfile=-",
            self.tapname,
            "--config",
            str(self.config_path),
            *self.args,
        ]

    def start(self, timeout: float = 20.0) -> Daemon:
        self.launch()
        self.wait_for(self.READY, timeout)
        return self

    def launch(self) -> None:
        """Start the process and collect its log; do not wait for anything."""
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=self.env,
            cwd=self.directory,
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            match = self.LISTEN.search(line)
            if match:
                host, _, port = match.group(3).rpartition(":")
                key = (match.group(1), match.group(2))
                self.ports.setdefault(key, []).append((host, int(port)))
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 10.0) -> str:
        """Block until a log line matches; fail with the log if it does not."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                assert self.process is not None
                if self._eof:
                    # Its output has ended, so it has exited or soon will.
                    try:
                        code = self.process.wait(10)
                    except subprocess.TimeoutExpired:
                        code = None
                    raise AssertionError(
                        f"twistd exited ({code}) before {regex.pattern!r}:\n"
                        + self.log()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {regex.pattern!r} within {timeout}s:\n" + self.log()
                    )
                self._changed.wait(left)

    def log(self) -> str:
        return "\n".join(self.lines)

    def port(self, service: str, kind: str = "TCP", index: int = 0) -> int:
        return self.ports[(service, kind)][index][1]

    def stop(self, timeout: float = 10.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


@contextmanager
def running(
    tapname: str, ini: str, args: Sequence[str] = (), **kwargs: Any
) -> Iterator[Daemon]:
    daemon = Daemon(tapname, ini, args, **kwargs)
    try:
        yield daemon.start()
    finally:
        daemon.stop()


def runnable_units(directory: Path) -> Path:
    """
    Copies of the shipped systemd units in C{directory}, with ExecStart
    pointing at this venv's twistd, which C{systemd-analyze verify} checks
    exists (the shipped path is /opt/sockd/bin/twistd).
    """
    twistd = Path(sys.executable).parent / "twistd"
    for unit in (ROOT / "etc" / "systemd").glob("*.s*"):
        text = unit.read_text().replace("/opt/sockd/bin/twistd", str(twistd))
        (directory / unit.name).write_text(text)
    return directory


def tcp_exchange(
    port: int,
    data: bytes,
    host: str = "127.0.0.1",
    timeout: float = 5.0,
    shut: bool = True,
    source: str | None = None,
) -> bytes:
    """Send C{data}, half-close, and read until the server closes."""
    with socket.create_connection(
        (host, port), timeout=timeout, source_address=(source, 0) if source else None
    ) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def run_tool(
    argv: Sequence[str], data: bytes = b"", timeout: float = 10.0
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        list(argv), input=data, capture_output=True, timeout=timeout, check=False
    )


def run_bounded(
    function: Callable[[], Any],
    timeout: float = 10.0,
    release: Callable[[], None] | None = None,
) -> Any:
    """
    Call C{function} in a thread and return what it returns (or raise what
    it raises); fail if it has not finished within C{timeout} seconds,
    after calling C{release} to unblock it (e.g. open the other end of the
    FIFO it waits on).
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, function()))
        except BaseException as e:
            outcome.append((False, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if release is not None:
            release()
        thread.join(timeout)
        raise AssertionError(f"{function!r} still blocked after {timeout}s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def unblock_fifo(path: Path | str) -> Callable[[], None]:
    """A C{release} for L{run_bounded}: open and close both ends of a FIFO."""

    def release() -> None:
        for flags in (os.O_RDONLY, os.O_WRONLY):
            # ENXIO when opening for writing: no reader to unblock.
            with contextlib.suppress(OSError):
                os.close(os.open(path, flags | os.O_NONBLOCK))

    return release


def tempdir(case: Any) -> Path:
    """A fresh directory removed after the test (trial's mktemp writes into
    the working directory when run under pytest)."""
    path = Path(tempfile.mkdtemp(prefix="sockd-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def reactor_test(timeout: float = 10.0) -> Any:
    """
    Run an C{async def} test on the real reactor through pytest-twisted,
    failing it after C{timeout} seconds.  (trial's C{TestCase} cannot drive
    the reactor once pytest-twisted has started it in its greenlet.)
    """

    def decorate(test: Any) -> Any:
        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> Any:
            from twisted.internet import reactor

            d = Deferred.fromCoroutine(test(*args, **kwargs))
            d.addTimeout(timeout, reactor)
            return await d

        return pytest_twisted.ensureDeferred(run)

    return decorate


class ReactorTest:
    """
    A base for real-reactor test classes run by pytest-twisted, with the
    C{addCleanup} and C{assert*} methods of trial's test cases.  Cleanups
    may return Deferreds or coroutines; they run after the test, last first.
    """

    _cleanups: list[tuple[Any, tuple[Any, ...]]]

    @pytest.fixture(autouse=True)
    def _run_cleanups(self) -> Iterator[None]:
        self._cleanups = []
        yield
        while self._cleanups:
            function, args = self._cleanups.pop()
            result = function(*args)
            if inspect.iscoroutine(result):
                result = Deferred.fromCoroutine(result)
            if isinstance(result, Deferred):
                pytest_twisted.blockon(result)

    def addCleanup(self, function: Any, *args: Any) -> None:
        self._cleanups.append((function, args))

    def assertEqual(self, first: Any, second: Any) -> None:
        assert first == second

    def assertTrue(self, value: Any) -> None:
        assert value

    def assertFalse(self, value: Any) -> None:
        assert not value

    def assertIsInstance(self, value: Any, kind: Any) -> None:
        assert isinstance(value, kind), value

    def assertGreater(self, first: Any, second: Any) -> None:
        assert first > second

    def assertLess(self, first: Any, second: Any) -> None:
        assert first < second

    def assertLessEqual(self, first: Any, second: Any) -> None:
        assert first <= second
