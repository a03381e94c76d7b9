"""
Integration tests: a real C{twistd -n sockd-echo} on 127.0.0.1 with
ephemeral ports, talked to with nc, socat and plain sockets.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TWISTD, Daemon, need, run_tool, running, tcp_exchange

pytestmark = pytest.mark.integration

BASE = """
[echo]
listen = tcp:0:interface=127.0.0.1
listen_udp = udp:0:interface=127.0.0.1
"""


@pytest.fixture(scope="module")
def line_daemon() -> Iterator[Daemon]:
    with running(
        "sockd-echo",
        BASE
        + """
        max_line_length = 64
        max_connections_per_ip = 3
        line_timeout = 1
        udp_max_datagram = 1000
        udp_rate = 5
        udp_burst = 5
        """,
    ) as daemon:
        yield daemon


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


def test_nc_half_close_lf_and_crlf(line_daemon: Daemon) -> None:
    nc = need("nc")
    port = line_daemon.port("echo")
    result = run_tool(
        [nc, "-N", "127.0.0.1", str(port)], "hello\r\nça va\nlast".encode()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "HELLO\r\nÇA VA\nLAST".encode()


def test_utf8_and_invalid_bytes(line_daemon: Daemon) -> None:
    port = line_daemon.port("echo")
    answer = tcp_exchange(port, "żółw\n".encode() + b"caf\xe9\r\n")
    assert answer == "ŻÓŁW\n".encode() + b"CAF\xe9\r\n"


def test_sockd_echo_client(line_daemon: Daemon) -> None:
    port = line_daemon.port("echo")
    result = run_tool(
        [sys.executable, "-m", "sockd.client.main", "echo", f"127.0.0.1:{port}", "hi"]
    )
    assert result.stdout == b"HI\n", result.stderr


def test_overlong_line(line_daemon: Daemon) -> None:
    port = line_daemon.port("echo")
    answer = tcp_exchange(port, b"ok\n" + b"x" * 100 + b"\n")
    assert answer == b"OK\nERR line longer than 64 bytes; closing\r\n"


def test_per_ip_cap_and_other_source(line_daemon: Daemon) -> None:
    # Sources of their own, so slots still being released after this test
    # cannot refuse the next one.
    port = line_daemon.port("echo")
    held = [
        socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.5", 0)
        )
        for _ in range(3)
    ]
    try:
        # Make sure the server has accepted all three before the fourth.
        for s in held:
            s.sendall(b"a\n")
            assert s.recv(10) == b"A\n"
        refused = tcp_exchange(port, b"x\n", shut=False, source="127.0.0.5")
        assert refused == b"ERR too many connections from your address\r\n"
        assert tcp_exchange(port, b"y\n", source="127.0.0.6") == b"Y\n"
    finally:
        for s in held:
            s.close()


def test_slowloris_line_deadline(line_daemon: Daemon) -> None:
    # line_timeout = 1 while the idle timeout is 300 s: an unfinished line
    # is cut by its own deadline.
    port = line_daemon.port("echo")
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"never finished")
        assert s.recv(100) == b""
    assert time.monotonic() - start < 8


def test_udp_with_socat_and_oversize(line_daemon: Daemon) -> None:
    port = line_daemon.port("echo", "UDP")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"y" * 1001, ("127.0.0.1", port))  # over the limit: dropped
        s.sendto("ça".encode(), ("127.0.0.1", port))
        data, _ = s.recvfrom(65536)
        assert data == "ÇA".encode()
    socat = need("socat")
    result = run_tool(
        [socat, "-t", "2", "-T", "2", "-", f"UDP:127.0.0.1:{port}"], b"from socat\n"
    )
    assert result.stdout == b"FROM SOCAT\n", result.stderr


def test_udp_flood_is_capped_per_source(line_daemon: Daemon) -> None:
    port = line_daemon.port("echo", "UDP")
    server = ("127.0.0.1", port)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        flood.bind(("127.0.0.2", 0))
        other.bind(("127.0.0.3", 0))
        other.settimeout(5)
        # Ten times the burst, and few enough that the socket's receive
        # buffer holds them all even if the daemon is not scheduled meanwhile
        # (a full buffer would drop the marker).
        for i in range(50):
            flood.sendto(b"f%d" % i, server)
        # Datagrams are handled in order: once the other source's answer is
        # back, every answer to the flood has been sent.
        other.sendto(b"marker", server)
        assert other.recvfrom(100)[0] == b"MARKER"
        flood.setblocking(False)
        answers = 0
        with contextlib.suppress(BlockingIOError):
            while answers < 1000:
                flood.recvfrom(100)
                answers += 1
        assert 5 <= answers <= 7


def test_udp_with_nc(line_daemon: Daemon) -> None:
    nc = need("nc")
    port = line_daemon.port("echo", "UDP")
    result = run_tool([nc, "-u", "-w", "1", "127.0.0.1", str(port)], b"from nc\n")
    assert result.stdout == b"FROM NC\n", result.stderr


def test_raw_mode_tutorial_client() -> None:
    # The tutorial's client sends no newline and waits for its answer.
    with (
        running(
            "sockd-echo",
            BASE,
            args=["--mode", "raw", "--listen", "tcp:0:interface=127.0.0.1"],
        ) as daemon,
        socket.create_connection(("127.0.0.1", daemon.port("echo")), timeout=5) as s,
    ):
        s.sendall(b"hello, server")
        assert s.recv(1024) == b"HELLO, SERVER"


def test_peer_that_never_reads() -> None:
    with running(
        "sockd-echo",
        BASE
        + """
        mode = raw
        idle_timeout = 2
        max_connections_per_ip = 1
        """,
        args=["--set", "listen_udp="],
    ) as daemon:
        assert daemon.process is not None
        port = daemon.port("echo")
        before = rss_kib(daemon.process.pid)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        chunk = b"z" * 65536
        pushed = 0
        deadline = time.monotonic() + 5
        stalled_since = None
        while pushed < 256 * 2**20 and time.monotonic() < deadline:
            try:
                pushed += s.send(chunk)
                stalled_since = None
            except BlockingIOError:
                # The server stopped reading: wait briefly for it to move.
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1:
                    break
                select_wait(s)
        growth = rss_kib(daemon.process.pid) - before
        # Kernel buffers hold a few MiB; the server's own buffer stays small.
        assert pushed < 64 * 2**20, pushed
        assert growth < 30 * 1024, growth
        # Idle timeout, then abort: the slot frees for the next client.
        daemon.wait_for(r"closing 127\.0\.0\.1: idle timeout", timeout=10)
        s.close()
        deadline = time.monotonic() + 10
        while True:
            answer = tcp_exchange(port, b"next")
            if answer == b"NEXT" or time.monotonic() > deadline:
                break
        assert answer == b"NEXT"


def select_wait(s: socket.socket) -> None:
    import select

    select.select([], [s], [], 0.2)


def test_descriptor_exhaustion_recovers() -> None:
    with running(
        "sockd-echo",
        BASE + "max_connections_per_ip = 1000\n",
        args=["--set", "listen_udp="],
        wrapper=["sh", "-c", 'ulimit -n 64 && exec "$@"', "sh"],
    ) as daemon:
        port = daemon.port("echo")
        held = []
        try:
            for _ in range(100):
                try:
                    held.append(
                        socket.create_connection(("127.0.0.1", port), timeout=2)
                    )
                except OSError as e:
                    assert e.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT, None)
                    break
        finally:
            for s in held:
                s.close()
        assert len(held) > 64
        deadline = time.monotonic() + 15
        answer = b""
        while time.monotonic() < deadline:
            try:
                answer = tcp_exchange(port, b"alive\n", timeout=3)
            except OSError:
                continue
            if answer == b"ALIVE\n":
                break
        assert answer == b"ALIVE\n"
        assert daemon.process is not None and daemon.process.poll() is None


def test_config_error_exit_status(tmp_path: Path) -> None:
    ini = tmp_path / "bad.ini"
    ini.write_text(
        "[echo]\nlisten = tcp:0:interface=127.0.0.1\nmax_connections = many\n"
    )
    result = subprocess.run(
        [
            *TWISTD,
            "-n",
            "--pidfile=",
            "sockd-echo",
            "--config",
            str(ini),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{ini}, line 3: [echo] max_connections = 'many'" in output
    assert "listening on" not in output


def test_bind_error_exit_status() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(
            "sockd-echo", f"[echo]\nlisten = tcp:{port}:interface=127.0.0.1\n"
        )
        with pytest.raises(AssertionError, match="twistd exited"):
            daemon.start(timeout=30)
        assert daemon.process is not None and daemon.process.returncode != 0
        assert f"sockd: echo cannot listen on tcp:{port}:interface=127.0.0.1" in (
            daemon.log()
        )
