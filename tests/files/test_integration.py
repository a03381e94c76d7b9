"""
Integration tests: a real C{twistd -n sockd-file} on 127.0.0.1 with an
ephemeral port and a temporary root, talked to with nc, curl, and plain
sockets as the classic tutorial's client does.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Daemon, need, run_tool, running, tcp_exchange

pytestmark = pytest.mark.integration

CANARY = b"CANARY-never-served"
BIG = 24 * 1024 * 1024 + 13


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("files")
    (base / "canary").write_bytes(CANARY)
    (base / "files-secret").mkdir()
    (base / "files-secret" / "x").write_bytes(CANARY)
    root = base / "files"
    root.mkdir()
    (root / "notes.txt").write_bytes(b"hello notes\n")
    (root / "big.bin").write_bytes(os.urandom(BIG))
    (root / "real").mkdir()
    (root / "real" / "x").write_bytes(b"inside\n")
    os.mkfifo(root / "fifo")
    return root


@pytest.fixture(scope="module")
def daemon(tree: Path) -> Iterator[Daemon]:
    with running(
        "sockd-file",
        f"""
        [sockd]
        abort_grace = 0.5
        [echo]
        enabled = false
        [file]
        listen = tcp:0:interface=127.0.0.1
        root = {tree}
        max_connections_per_ip = 4
        idle_timeout = 2
        """,
    ) as d:
        yield d


def fetch(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    return tcp_exchange(port, request, timeout=timeout)


def test_nc_half_close(daemon: Daemon, tree: Path) -> None:
    nc = need("nc")
    port = daemon.port("file")
    result = run_tool([nc, "-N", "127.0.0.1", str(port)], b"notes.txt\n")
    assert result.stdout == b"hello notes\n"
    result = run_tool([nc, "-N", "127.0.0.1", str(port)], b"big.bin\n", timeout=20)
    assert result.stdout == (tree / "big.bin").read_bytes()


def test_sendfile_behind_haproxy_listener(tree: Path) -> None:
    """
    Downloads through a C{haproxy:} listener (a PROXY v1 and a v2 header,
    as HAProxy sends them) get the same bytes as a direct one, and every
    body byte goes out with sendfile (the metrics say so), not copied.
    """
    ini = f"""
    [sockd]
    trusted_proxies = 127.0.0.1/32
    [echo]
    enabled = false
    [file]
    listen = haproxy:tcp:0:interface=127.0.0.1 tcp:0:interface=127.0.0.1
    root = {tree}
    [metrics]
    enabled = true
    listen = tcp:0:interface=127.0.0.1
    """
    v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 70\r\n"
    v2 = (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
        + socket.inet_aton("192.0.2.8")
        + socket.inet_aton("127.0.0.1")
        + (40001).to_bytes(2, "big")
        + (70).to_bytes(2, "big")
    )
    expected = (tree / "big.bin").read_bytes()
    with running("sockd-file", ini) as d:
        proxied, direct = d.port("file"), d.port("file", index=1)
        assert fetch(direct, b"big.bin\n", 20) == expected
        assert fetch(proxied, v1 + b"big.bin\n", 20) == expected
        framed = fetch(proxied, v2 + b"GET big.bin\nQUIT\n", 20)
        header, _, rest = framed.partition(b"\r\n")
        assert header.startswith(b"OK %d size=%d " % (BIG, BIG))
        assert rest == expected + b"OK bye\r\n"
        url = f"http://127.0.0.1:{d.port('metrics')}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        logs = d.log()
    samples = {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("sockd_file_")
    }
    assert samples["sockd_file_sent_bytes"] == 3 * BIG
    assert samples["sockd_file_sendfile_bytes"] == 3 * BIG
    # The clients the headers named, not the proxy's address.
    assert "192.0.2.7" in logs and "192.0.2.8" in logs


def test_tutorial_client(daemon: Daemon) -> None:
    """The name with no line ending, no half-close: then it waits for bytes."""
    with socket.create_connection(("127.0.0.1", daemon.port("file")), 5) as s:
        s.sendall(b"notes.txt")
        data = b""
        while chunk := s.recv(1024):
            data += chunk
    assert data == b"hello notes\n"


def test_curl_gopher(daemon: Daemon, tree: Path) -> None:
    curl = need("curl")
    base = f"gopher://127.0.0.1:{daemon.port('file')}"
    result = run_tool([curl, "-s", f"{base}/9/big.bin"], timeout=20)
    assert result.returncode == 0
    assert result.stdout == (tree / "big.bin").read_bytes()
    menu = run_tool([curl, "-s", f"{base}/"]).stdout
    assert menu.endswith(b"\r\n.\r\n")
    assert b"0notes.txt\t/notes.txt\t127.0.0.1\t" in menu
    assert b"1real\t/real\t127.0.0.1\t" in menu
    assert b"fifo" not in menu


def test_big_file_framed(daemon: Daemon, tree: Path) -> None:
    """GET and SUM of a 24 MiB file, byte for byte, on one connection."""
    expected = (tree / "big.bin").read_bytes()
    data = fetch(daemon.port("file"), b"SUM big.bin\nGET big.bin\nQUIT\n", 20)
    digest = hashlib.sha256(expected).hexdigest().encode()
    line, _, rest = data.partition(b"\r\n")
    assert line.startswith(b"OK sha256=%s size=%d " % (digest, BIG))
    header, _, rest = rest.partition(b"\r\n")
    assert header.startswith(b"OK %d size=%d " % (BIG, BIG))
    assert rest[:BIG] == expected
    assert rest[BIG:] == b"OK bye\r\n"


def test_reader_that_never_reads(daemon: Daemon) -> None:
    """
    A client asks for 24 MiB and reads nothing: the transfer stalls with no
    progress, the idle timeout closes it, and the abort follows the grace.
    """
    port = daemon.port("file")
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"big.bin\n")
        daemon.wait_for(r"file: closing 127\.0\.0\.1: idle timeout", 10)
        # Every other connection here lasts well under the 2 s idle timeout.
        line = daemon.wait_for(
            r"file: 127\.0\.0\.1:\d+ disconnected after [2-9]\.\d+s", 5
        )
        duration = float(line.split("disconnected after ")[1].split("s")[0])
        assert 2.0 <= duration < 2.0 + 0.5 + 2.0  # idle, then at most the grace
    assert fetch(port, b"notes.txt\n") == b"hello notes\n"


def test_fifo_refused_while_others_served(daemon: Daemon) -> None:
    port = daemon.port("file")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), 5) as fifo_client:
        fifo_client.sendall(b"fifo\n")
        assert fetch(port, b"notes.txt\n") == b"hello notes\n"
        fifo_client.settimeout(1)
        assert fifo_client.recv(100) == b""  # closed, nothing sent
    assert time.monotonic() - started < 1.5


def test_connection_cap(daemon: Daemon) -> None:
    port = daemon.port("file")
    held = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(4)]
    try:
        with socket.create_connection(("127.0.0.1", port), 5) as extra:
            extra.settimeout(5)
            assert (
                extra.recv(200) == b"ERR 429 too many connections from your address\r\n"
            )
        # Another source address is still served.
        assert (
            tcp_exchange(port, b"notes.txt\n", source="127.0.0.2") == b"hello notes\n"
        )
    finally:
        for s in held:
            s.close()


ERROR_ITEM = re.compile(rb"34\d\d [ -~]+\t\terror\.host\t1\r\n\.\r\n")
HOSTILE = [
    b"../canary",
    b"a/../../canary",
    b"..\\..\\canary",
    "\uff0e\uff0e/canary".encode(),
    b"....//canary",
    b".",
    b"\x00",
    b"x" * 256,
    b"a/" * 2048 + b"x",
    b"\xff\xfe",
    b"../files-secret/x",
    b"/../files-secret/x",
    b"GET ../canary",
    b"GET %2e%2e/canary",
    b"GET ..%2fcanary",
    b"GET ../files-secret/x",
]


def test_hostile_paths_on_the_wire(daemon: Daemon) -> None:
    """Every hostile request, bare and framed: no canary byte ever comes back."""
    port = daemon.port("file")
    for request in HOSTILE:
        answer = fetch(port, request + b"\r\n")
        assert CANARY not in answer, request
        # Sent with CR LF: a bare request is a Gopher selector (error items).
        refused = answer.startswith(b"ERR 4") or ERROR_ITEM.fullmatch(answer)
        assert answer == b"" or refused, (request, answer)


def test_symlink_swap_loop(daemon: Daemon, tree: Path) -> None:
    """300 requests on real sockets while a link flips in and out."""
    port = daemon.port("file")
    link, temp = tree / "flip", tree / "flip.tmp"
    targets = ["real/x", "../canary", "../files-secret/x"]
    os.symlink(targets[0], link)
    stop = threading.Event()

    def swap() -> None:
        n = 0
        while not stop.is_set() and n < 1_000_000:
            os.symlink(targets[n % 3], temp)
            os.replace(temp, link)
            n += 1

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    answers = set()
    try:
        for _ in range(300):
            answers.add(fetch(port, b"flip\n"))
    finally:
        stop.set()
        thread.join(5)
        link.unlink()
    assert answers <= {b"inside\n", b""}
    assert CANARY not in b"".join(answers)


@pytest.fixture
def writable(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit is not installed")
    root = tmp_path / "up"
    root.mkdir()
    # The daemon may not write files larger than 4 MiB: a full disk, to it.
    with running(
        "sockd-file",
        f"""
        [echo]
        enabled = false
        [file]
        listen = tcp:0:interface=127.0.0.1
        root = {root}
        writable = true
        upload_allow = 127.0.0.1
        """,
        wrapper=[prlimit, f"--fsize={4 * 1024 * 1024}", "--"],
    ) as d:
        yield d, root


def test_uploads_full_disk_and_kill(writable: tuple[Daemon, Path]) -> None:
    daemon, root = writable
    port = daemon.port("file")
    body = os.urandom(1024 * 1024)
    answer = fetch(port, b"PUT one.bin %d\n" % len(body) + body + b"QUIT\n")
    digest = hashlib.sha256(body).hexdigest().encode()
    assert answer == b"OK ready\r\nOK stored %d sha256=%s\r\nOK bye\r\n" % (
        len(body),
        digest,
    )
    assert (root / "one.bin").read_bytes() == body

    # RLIMIT_FSIZE: the write fails with EFBIG; nothing under the real name.
    big = os.urandom(6 * 1024 * 1024)
    answer = fetch(port, b"PUT big.bin %d\n" % len(big) + big)
    assert answer.startswith(b"OK ready\r\nERR 413 cannot write: File too large")
    assert sorted(os.listdir(root)) == ["one.bin"]

    # SIGKILL in the middle of an upload: a temporary may stay, never a
    # partial file under the real name.
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"PUT cut.bin 1000000\n" + body[:300000])
        s.settimeout(5)
        assert s.recv(100) == b"OK ready\r\n"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            temps = [n for n in os.listdir(root) if n.startswith(".sockd-upload.")]
            if temps and (root / temps[0]).stat().st_size >= 300000:
                break
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(5)
    assert not (root / "cut.bin").exists()
    assert (root / "one.bin").read_bytes() == body


def test_sigterm_during_a_transfer(tree: Path, tmp_path: Path) -> None:
    """
    SIGTERM while a client is part-way through 24 MiB: the listener closes,
    the transfer finishes whole, then the daemon exits.
    """
    expected = (tree / "big.bin").read_bytes()
    ini = f"""
        [sockd]
        shutdown_grace = 20
        [file]
        listen = tcp:0:interface=127.0.0.1
        root = {tree}
        """
    with running("sockd-file", ini, directory=tmp_path) as d:
        assert d.process is not None
        port = d.port("file")
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET big.bin\n")
            received = bytearray(s.recv(65536))
            d.process.send_signal(signal.SIGTERM)
            d.wait_for("letting work in flight finish")
            # The listener closes (within a reactor turn or two) while this
            # transfer goes on.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), 1).close()
                except OSError:
                    break
            else:
                raise AssertionError("still accepting after SIGTERM")
            while chunk := s.recv(1 << 20):
                received += chunk
        header, _, body = bytes(received).partition(b"\r\n")
        assert header.startswith(b"OK %d size=%d " % (BIG, BIG))
        # Then, being framed, it is told why the connection ends.
        assert body == expected + b"ERR 503 shutting down\r\n"
        assert d.process.wait(20) in (0, -signal.SIGTERM)


def test_sigterm_removes_a_stalled_upload_and_start_sweeps(tmp_path: Path) -> None:
    """
    Stale temporaries a crash left (in the root and a subdirectory) are
    removed at start; an upload that stalls until the shutdown deadline
    after SIGTERM leaves no temporary file behind when the daemon exits.
    """
    root = tmp_path / "up"
    (root / "sub").mkdir(parents=True)
    old = time.time() - 3600
    stale = [
        root / ".sockd-upload.00000000000000aa",
        root / "sub" / ".sockd-upload.00000000000000bb",
    ]
    for path, size in zip(stale, (1000, 24), strict=True):
        path.write_bytes(b"x" * size)
        os.utime(path, (old, old))
    daemon = Daemon(
        "sockd-file",
        f"""
        [sockd]
        shutdown_grace = 1
        abort_grace = 0.5
        [file]
        listen = tcp:0:interface=127.0.0.1
        root = {root}
        writable = true
        upload_allow = 127.0.0.1
        """,
        directory=tmp_path,
    )
    try:
        daemon.start()
        daemon.wait_for(r"file: swept .*: removed 2 stale upload file\(s\), 1024 bytes")
        assert [p for p in stale if p.exists()] == []
        assert daemon.process is not None
        with socket.create_connection(("127.0.0.1", daemon.port("file")), 5) as s:
            s.sendall(b"PUT stall.bin 1000000\n" + b"y" * 1000)
            s.settimeout(5)
            assert s.recv(100) == b"OK ready\r\n"
            temps = [n for n in os.listdir(root) if n.startswith(".sockd-upload.")]
            assert len(temps) == 1
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(10) in (0, -signal.SIGTERM)
        daemon.wait_for(r"removed 1 unfinished upload\(s\) at the shutdown deadline")
        assert sorted(os.listdir(root)) == ["sub"]
        assert os.listdir(root / "sub") == []
    finally:
        daemon.stop()


def test_pipelined_listings_do_not_stall_echo(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """
    A client pipelines LISTs of a 20,000-entry directory and stops reading:
    the same daemon's echo still answers at once (listings are produced a
    slice per turn, and not at all while the client's buffer is full).
    """
    root = tmp_path_factory.mktemp("crowded")
    crowded = root / "crowded"
    crowded.mkdir()
    (crowded / "entry").touch()
    for i in range(20_000):  # links: ten times faster to make than files
        os.link(crowded / "entry", crowded / f"entry-{i:05d}")
    with (
        running(
            "sockd",
            f"""
            [echo]
            enabled = true
            listen = tcp:0:interface=127.0.0.1
            listen_udp =
            [chat]
            enabled = false
            [file]
            enabled = true
            listen = tcp:0:interface=127.0.0.1
            root = {root}
            """,
        ) as d,
        socket.create_connection(("127.0.0.1", d.port("file")), 10) as lister,
        socket.create_connection(("127.0.0.1", d.port("echo")), 10) as echo,
    ):
        lister.sendall(b"LIST crowded\n" * 20)
        # The first answer has begun: the daemon is busy with the listings.
        head = b""
        while not head.startswith(b"OK\r\n"):
            head += lister.recv(4)
        slowest = 0.0
        for i in range(5):
            started = time.monotonic()
            echo.sendall(b"ping %d\n" % i)
            answer = b""
            while not answer.endswith(b"\n"):
                answer += echo.recv(64)
            slowest = max(slowest, time.monotonic() - started)
            assert answer == b"PING %d\n" % i
        assert slowest < 1.0  # seconds on the old code, which listed in one turn
