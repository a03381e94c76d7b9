"""
Integration tests of C{[sockd] workers}: a real C{twistd -n sockd} with two
workers on 127.0.0.1.  With the main process stopped (SIGSTOP), only the
workers can answer, which shows they serve the shared sockets.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sockd.client import cert
from tests.helpers import Daemon, running, tcp_exchange

pytestmark = pytest.mark.integration

SERVING = re.compile(r"sockd: worker (\d) \(pid (\d+)\) serving")


def ini(directory: Path) -> str:
    (directory / "root").mkdir()
    (directory / "root" / "hello.txt").write_bytes(b"hello from the root\n")
    pem, key = cert.make_certificate("localhost")
    (directory / "cert.pem").write_bytes(pem)
    (directory / "key.pem").write_bytes(key)
    return """
        [sockd]
        workers = 3
        shutdown_grace = 3
        abort_grace = 1
        [echo]
        listen = tcp:0:interface=127.0.0.1
            ssl:0:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem
        listen_udp = udp:0:interface=127.0.0.1
        [file]
        enabled = true
        root = root
        listen = tcp:0:interface=127.0.0.1
        [chat]
        enabled = true
        listen = udp:0:interface=127.0.0.1
        [metrics]
        enabled = true
        listen = tcp:0:interface=127.0.0.1
        """


def workers_of(daemon: Daemon, count: int = 2) -> dict[int, int]:
    """Wait until C{count} workers serve: index -> pid of the latest."""
    for index in range(1, count + 1):
        daemon.wait_for(rf"sockd: worker {index} \(pid \d+\) serving", 20)
    found: dict[int, int] = {}
    for line in list(daemon.lines):
        match = SERVING.search(line)
        if match:
            found[int(match.group(1))] = int(match.group(2))
    return found


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


#: echo connections this module's daemon has been sent (TCP and TLS)
ECHO_CONNECTIONS = [0]


def echo(daemon: Daemon, data: bytes) -> bytes:
    ECHO_CONNECTIONS[0] += 1
    return tcp_exchange(daemon.port("echo"), data)


def tls_echo(port: int, directory: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(directory / "cert.pem"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        ECHO_CONNECTIONS[0] += 1
        tls.sendall(b"over tls\n")
        return tls.recv(100)


def scrape(daemon: Daemon) -> str:
    url = f"http://127.0.0.1:{daemon.port('metrics')}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text: str = answer.read().decode()
        return text


def sample(text: str, series: str) -> float:
    match = re.search("^" + re.escape(series) + r" (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("workers")
    with running("sockd", ini(directory), directory=directory) as daemon:
        workers_of(daemon)
        yield daemon


def test_workers_serve_the_shared_sockets(daemon: Daemon) -> None:
    assert daemon.process is not None
    main = daemon.process.pid
    pids = workers_of(daemon)
    assert sorted(pids) == [1, 2] and main not in pids.values()
    with paused(main):
        for n in range(10):
            answer = echo(daemon, b"line %d\n" % n)
            assert answer == b"LINE %d\n" % n
        # UDP: a socket per process (SO_REUSEPORT), each client address
        # given to one of them; of 16 clients some reach a worker at once.
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
        for n, client in enumerate(clients):
            client.sendto(b"datagram %d" % n, ("127.0.0.1", daemon.port("echo", "UDP")))
        early = select.select(clients, [], [], 5)[0]
        assert early
        assert tls_echo(daemon.port("echo", "TCP", 1), daemon.directory) == (
            b"OVER TLS\n"
        )
        assert tcp_exchange(daemon.port("file"), b"hello.txt\r\n") == (
            b"hello from the root\n"
        )
    # The rest were queued for the main process, which answers them now.
    try:
        for n, client in enumerate(clients):
            client.settimeout(5)
            assert client.recv(100) == b"DATAGRAM %d" % n
    finally:
        for client in clients:
            client.close()
    # Chat is served by the main process alone, as before.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"/nick alice, I am new\n", ("127.0.0.1", daemon.port("chat", "UDP")))
        # (Its first answer asks a new address to prove it can receive; 22
        # bytes buy this prompt and its machine line, 47 bytes.)
        assert s.recv(65536).startswith(b"*** to join, send: /v ")


def test_metrics_add_up_every_process(daemon: Daemon) -> None:
    for _ in range(20):
        assert echo(daemon, b"x\n") == b"X\n"
    # Workers report once a second: the sum catches up within a few.
    series = 'sockd_connections_accepted_total{service="echo"}'
    wait_until(
        lambda: sample(scrape(daemon), series) == ECHO_CONNECTIONS[0], 10, "counted"
    )
    assert sample(scrape(daemon), "sockd_workers") == 2


def test_a_dead_worker_is_replaced(daemon: Daemon) -> None:
    pids = workers_of(daemon)
    os.kill(pids[1], signal.SIGKILL)
    daemon.wait_for(rf"worker 1 \(pid {pids[1]}\) was killed by SIGKILL; restarting")
    line = daemon.wait_for(rf"sockd: worker 1 \(pid (?!{pids[1]}\))\d+\) serving")
    match = SERVING.search(line)
    assert match is not None
    new = int(match.group(2))
    assert not gone(new)
    assert daemon.process is not None
    with paused(daemon.process.pid):
        for _ in range(5):
            assert echo(daemon, b"again\n") == b"AGAIN\n"


def test_sigterm_stops_every_process(tmp_path: Path) -> None:
    daemon = Daemon("sockd", ini(tmp_path), directory=tmp_path)
    daemon.start()
    try:
        pids = workers_of(daemon)
    finally:
        code = daemon.stop(20)
    # twistd ends by re-raising the signal it stopped for.
    assert code == -signal.SIGTERM, daemon.log()
    for index, pid in pids.items():
        assert gone(pid)
        assert f"sockd: worker {index} (pid {pid}) exited" in daemon.log()


def test_workers_do_not_outlive_a_killed_main_process(tmp_path: Path) -> None:
    daemon = Daemon("sockd", ini(tmp_path), directory=tmp_path)
    daemon.start()
    try:
        pids = workers_of(daemon)
        port = daemon.port("echo")
        assert daemon.process is not None
        daemon.process.kill()
        daemon.process.wait(10)
        wait_until(lambda: all(gone(p) for p in pids.values()), 15, "gone")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False

        # Nobody holds the listening socket any more.
        wait_until(refused, 5, "refused")
    finally:
        daemon.stop()
