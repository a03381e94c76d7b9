"""
Tests for C{sockd get|ls|stat|put} (sockd.client.files, fileproto, tls),
against a small threaded fake sockd-file server on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import io
import ipaddress
import os
import pty
import re
import select
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sockd.client import fileproto, output
from sockd.client.fileproto import quote, unquote
from sockd.client.files import display, human_size
from sockd.client.main import main

MTIME = 1_764_000_000
S = TypeVar("S", bound=socketserver.BaseServer)


def unquote_arg(word: bytes) -> bytes:
    return unquote(word).lstrip(b"/")


class Handler(socketserver.StreamRequestHandler):
    """The framed protocol over C{server.files}, with faults on demand."""

    server: FakeServer
    timeout = 5

    def setup(self) -> None:
        if self.server.tls is not None:
            try:
                self.request = self.server.tls.wrap_socket(
                    self.request, server_side=True
                )
            except (ssl.SSLError, OSError):
                self.request.close()
                self.server.handshake_failures += 1
                raise
        super().setup()

    def answer(self, line: str) -> None:
        self.wfile.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def handle(self) -> None:
        srv = self.server
        if srv.greeting is not None:
            self.wfile.write(srv.greeting)
        while line := self.rfile.readline(4097):
            srv.requests.append(line)
            if srv.raw_answer is not None:
                self.wfile.write(srv.raw_answer)
                return
            words = line.rstrip(b"\r\n").split(b" ")
            verb = words[0].decode()
            args = [unquote_arg(w) for w in words[1:]]
            if verb in srv.errors:
                code, reason = srv.errors[verb]
                self.answer(f"ERR {code} {reason}")
                continue
            path = args[0] if args else b""
            data = srv.files.get(path)
            if verb == "GET":
                if data is None:
                    self.answer("ERR 404 not found")
                    continue
                offset = int(args[1]) if len(args) > 1 else 0
                if offset > len(data):
                    self.answer("ERR 416 offset beyond the end of the file")
                    continue
                body = data[offset:]
                self.answer(f"OK {len(body)} size={len(data)} mtime={srv.mtime}")
                if srv.cut_after is not None:
                    self.wfile.write(body[: srv.cut_after])
                    if srv.stall:
                        srv.release.wait(10)
                    return
                self.wfile.write(body)
                srv.mtime += srv.mtime_step
            elif verb == "SUM":
                if data is None:
                    self.answer("ERR 404 not found")
                    continue
                digest = srv.sum_override or hashlib.sha256(data).hexdigest()
                self.answer(f"OK sha256={digest} size={len(data)} mtime={srv.mtime}")
            elif verb == "STAT":
                if data is not None:
                    self.answer(f"OK type=file size={len(data)} mtime={srv.mtime}")
                elif path in srv.dirs():
                    self.answer(f"OK type=dir size=4096 mtime={srv.mtime}")
                else:
                    self.answer("ERR 404 not found")
            elif verb == "LIST":
                if path in srv.files:
                    self.answer("ERR 405 not a directory")  # as sockd-file says
                    continue
                if path not in srv.dirs() and path not in srv.listings:
                    self.answer("ERR 404 not found")
                    continue
                self.answer("OK")
                for kind, size, name in srv.listings.get(path) or srv.entries(path):
                    self.answer(f"{kind} {size} {srv.mtime} {quote(name)}")
                if srv.truncated:
                    self.answer(f"truncated {srv.truncated}")
                self.answer(".")
            elif verb == "PUT":
                if not srv.writable:
                    self.answer("ERR 403 not writable")
                    return
                length = int(args[1])
                self.answer("OK ready")
                body = self.rfile.read(length)
                if len(body) < length:
                    srv.discarded += 1
                    return
                srv.files[path] = body
                digest = srv.sum_override or hashlib.sha256(body).hexdigest()
                self.answer(f"OK stored {length} sha256={digest}")
            elif verb == "QUIT":
                self.answer("OK bye")
                return
            else:
                self.answer("ERR 400 bad request")


class FakeServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, files: dict[bytes, bytes], tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.tls = tls
        self.requests: list[bytes] = []
        self.errors: dict[str, tuple[int, str]] = {}
        #: LIST answers as given, whatever the files (hostile servers)
        self.listings: dict[bytes, list[tuple[str, int, bytes]]] = {}
        self.cut_after: int | None = None
        self.sum_override: str | None = None
        self.raw_answer: bytes | None = None
        self.greeting: bytes | None = None
        self.stall = False
        self.release = threading.Event()
        self.mtime = MTIME
        self.mtime_step = 0
        self.writable = False
        self.truncated = ""
        self.discarded = 0
        self.handshake_failures = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed handshakes are counted; tests assert on the client side

    def shutdown(self) -> None:
        self.release.set()  # a handler stalling mid-body goes on and ends
        super().shutdown()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def dirs(self) -> set[bytes]:
        found = {b""}
        for path in self.files:
            parts = path.split(b"/")[:-1]
            found.update(b"/".join(parts[: i + 1]) for i in range(len(parts)))
        return found

    def entries(self, directory: bytes) -> list[tuple[str, int, bytes]]:
        prefix = directory + b"/" if directory else b""
        out: dict[bytes, tuple[str, int, bytes]] = {}
        for path, data in self.files.items():
            if path.startswith(prefix):
                head, slash, _ = path[len(prefix) :].partition(b"/")
                out[head] = ("d", 4096, head) if slash else ("f", len(data), head)
        return sorted(out.values(), key=lambda e: e[2])


def threaded_servers(
    make: Callable[..., S],
) -> Iterator[Callable[..., S]]:
    """
    For a fixture: a function that starts C{make(...)} serving in a thread;
    every server started is shut down afterwards.
    """
    servers: list[S] = []

    def start(*args: Any, **kwargs: Any) -> S:
        server = make(*args, **kwargs)
        # A short poll interval keeps shutdown() quick at teardown.
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(name="serve")
def serve_fixture() -> Iterator[Callable[..., FakeServer]]:
    """C{serve(files, tls)} starts a L{FakeServer}; all stop at teardown."""

    def make(
        files: dict[bytes, bytes] | None = None, tls: ssl.SSLContext | None = None
    ) -> FakeServer:
        return FakeServer(dict(files or {}), tls)

    yield from threaded_servers(make)


BLOB = bytes(range(256)) * 12_288  # 3 MiB: several 1 MiB reads
FILES = {
    b"hello.txt": b"hello, world\n",
    b"blob.bin": BLOB,
    b"with space %.txt": b"odd name\n",
    b"docs/README.txt": b"read me\n",
    b"docs/deep/x": b"x",
    b"esc\x1b[31mred": b"e",
}


HELLO_SUM = hashlib.sha256(FILES[b"hello.txt"]).hexdigest()


def sockd(capfd: Any, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = int(e.code or 0)
    out, err = capfd.readouterr()
    return status, out, err


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Percent-encoding ---------------------------------------------------------


def test_quote_leaves_printable_ascii() -> None:
    assert quote("docs/README.txt") == "docs/README.txt"
    assert quote("/a-b_c~d+e,f") == "/a-b_c~d+e,f"


def test_quote_encodes_space_percent_controls_and_utf8() -> None:
    assert quote("with space %.txt") == "with%20space%20%25.txt"
    assert quote("a\r\nGET /etc/passwd") == "a%0D%0AGET%20/etc/passwd"
    assert quote("caf\u00e9\t\x7f") == "caf%C3%A9%09%7F"
    # Undecodable command-line bytes (surrogateescape) go out as they came.
    assert quote(os.fsdecode(b"\xff\xfe")) == "%FF%FE"


def test_quote_unquote_round_trip_every_byte() -> None:
    raw = bytes(range(256))
    encoded = quote(raw)
    assert all(0x21 <= ord(ch) < 0x7F for ch in encoded)
    assert unquote(encoded.encode()) == raw


def test_unquote_keeps_malformed_escapes() -> None:
    assert unquote(b"100%") == b"100%"
    assert unquote(b"%zz%4") == b"%zz%4"
    assert unquote(b"%41%62") == b"Ab"


# Display helpers ----------------------------------------------------------


class FakeTime:
    """A clock for a tqdm bar, as tqdm's own tests drive it."""

    def __init__(self, progress: output.Progress) -> None:
        self.now = 1000.0
        bar = progress.bar
        bar._time = lambda: self.now
        bar.start_t = bar.last_print_t = self.now


def bar_lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().replace("\n", "\r").split("\r") if line]


def test_progress_shows_size_rate_and_eta_on_a_terminal() -> None:
    stream = io.StringIO()
    progress = output.Progress(stream, "big.iso", 4 * 1024**2)
    clock = FakeTime(progress)
    clock.now += 2
    progress.update(2 * 1024**2)
    progress.finish()
    last = bar_lines(stream)[-1]
    assert last.startswith("big.iso:  50%")
    # Sizes in 1024s, the rate in 1000s (tqdm's way): 2 MiB in 2 s.
    assert "2.00M/4.00M" in last and "1.05MB/s" in last and "<00:02" in last
    assert stream.getvalue().endswith("\n")


def test_progress_resumed_download_counts_only_this_run() -> None:
    # Resumed at 900 of 1000 bytes: 50 new bytes in 5 s is 10 B/s, 5 s left.
    stream = io.StringIO()
    progress = output.Progress(stream, "f", 1000, initial=900)
    assert progress.bar.n == 900
    clock = FakeTime(progress)
    clock.now += 5
    progress.update(950)
    progress.finish()
    last = bar_lines(stream)[-1]
    assert " 95%" in last and "950/0.98k" in last
    assert "10.0B/s" in last and "<00:05" in last


def test_progress_rate_is_a_moving_average() -> None:
    # A burst (a server's token bucket allowance, the kernel's buffers) and
    # then 10 kB/s: the rate shown follows the steady rate, where an
    # average since the start stays several times above it.
    stream = io.StringIO()
    progress = output.Progress(stream, "f", None)
    clock = FakeTime(progress)
    clock.now += 0.1
    done = 4 * 1024**2
    progress.update(done)
    for _ in range(20):
        clock.now += 1
        done += 10_000
        progress.update(done)
    live = bar_lines(stream)[-1]
    rate = re.search(r"([\d.]+)kB/s", live)
    assert rate is not None and 9 < float(rate.group(1)) < 20, live
    # The line left at the end gives the average of the whole run.
    progress.finish()
    assert bar_lines(stream)[-1].startswith("f: 4.19MB [00:20, 219kB/s]")


def test_progress_shows_the_first_bytes_at_once() -> None:
    # A burst, then a stall: the bar must not stay at 0% while tqdm waits
    # out its redraw interval.
    stream = io.StringIO()
    progress = output.Progress(stream, "f", 1000)
    clock = FakeTime(progress)
    clock.now += 0.01
    progress.update(400)
    assert " 40%" in bar_lines(stream)[-1]
    clock.now += 0.01
    progress.update(500)  # within the interval: not redrawn
    assert " 40%" in bar_lines(stream)[-1]
    progress.finish()


def test_progress_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    progress = output.Progress(stream, "f", 10, enabled=False)
    progress.update(5)
    progress.finish()
    progress.abandon()
    assert stream.getvalue() == ""


def test_progress_abandon_ends_the_line() -> None:
    stream = io.StringIO()
    progress = output.Progress(stream, "f", 10)
    progress.update(5)
    progress.abandon()
    assert stream.getvalue().startswith("\r") and stream.getvalue().endswith("\n")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "quiet", "drawn"),
    [(Terminal, False, True), (Terminal, True, False), (io.StringIO, False, False)],
)
def test_progress_only_on_a_terminal_and_not_quiet(
    serve: Any,
    here: Path,
    monkeypatch: pytest.MonkeyPatch,
    stream: type[io.StringIO],
    quiet: bool,
    drawn: bool,
) -> None:
    server = serve(FILES)
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["get", server.address, "hello.txt", *(["-q"] if quiet else [])]
    assert main(argv) == 0
    assert ("hello.txt: 100%" in err.getvalue()) == drawn, err.getvalue()


def test_display_escapes_terminal_controls() -> None:
    assert display(b"plain name.txt") == "plain name.txt"
    assert display("caf\u00e9") == "caf\u00e9"
    assert display(b"esc\x1b[31mred") == "esc\\x1b[31mred"
    assert display(b"a\nb\rc\x7f\xc2\x9b") == "a\\x0ab\\x0dc\\x7f\\x9b"
    assert display("bidi\u202egnp.exe") == "bidi\\u202egnp.exe"
    assert display(b"bad\xffutf8") == "bad\\\\xffutf8"


# get ----------------------------------------------------------------------


def test_get_writes_the_file_and_verifies_it(
    serve: Any, here: Path, capfd: Any
) -> None:
    server = serve(FILES)
    status, out, err = sockd(capfd, "get", server.address, "blob.bin")
    assert (status, out, err) == (0, "", "")
    assert (here / "blob.bin").read_bytes() == BLOB
    assert sorted(os.listdir(here)) == ["blob.bin"]
    assert server.requests == [b"GET blob.bin\r\n", b"SUM blob.bin\r\n"]


def test_get_percent_encodes_the_path(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    status, _, err = sockd(capfd, "get", server.address, "with space %.txt")
    assert status == 0, err
    assert server.requests[0] == b"GET with%20space%20%25.txt\r\n"
    assert (here / "with space %.txt").read_bytes() == b"odd name\n"


def test_get_to_stdout(serve: Any, here: Path, capfdbinary: Any) -> None:
    server = serve(FILES)
    assert main(["get", server.address, "/docs/README.txt", "-o", "-"]) == 0
    assert capfdbinary.readouterr() == (b"read me\n", b"")
    assert os.listdir(here) == []


def test_get_into_a_directory(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    (here / "dl").mkdir()
    status, _, err = sockd(capfd, "get", server.address, "docs/README.txt", "-o", "dl")
    assert status == 0, err
    assert (here / "dl" / "README.txt").read_bytes() == b"read me\n"


def test_get_never_replaces_a_file_without_force(
    serve: Any, here: Path, capfd: Any
) -> None:
    server = serve(FILES)
    (here / "hello.txt").write_bytes(b"mine")
    status, _, err = sockd(capfd, "get", server.address, "hello.txt")
    assert status == 1
    assert "hello.txt exists: use --force" in err
    assert (here / "hello.txt").read_bytes() == b"mine"
    assert server.requests == []
    status, _, _ = sockd(capfd, "get", "-f", server.address, "hello.txt")
    assert status == 0
    assert (here / "hello.txt").read_bytes() == b"hello, world\n"


def test_get_refuses_a_part_file_without_continue(
    serve: Any, here: Path, capfd: Any
) -> None:
    server = serve(FILES)
    (here / "blob.bin.part").write_bytes(b"not ours")
    status, _, err = sockd(capfd, "get", server.address, "blob.bin")
    assert status == 1
    assert "--continue" in err
    assert (here / "blob.bin.part").read_bytes() == b"not ours"


def test_cut_connection_keeps_part_then_continue_resumes(
    serve: Any, here: Path, capfd: Any
) -> None:
    server = serve(FILES)
    server.cut_after = 1_500_000
    status, _, err = sockd(capfd, "get", server.address, "blob.bin")
    assert status == fileproto.EXIT_CONNECT
    assert "closed after 1500000 of 3145728 bytes" in err
    assert "partial data kept in blob.bin.part: resume with --continue" in err
    assert not (here / "blob.bin").exists()
    assert (here / "blob.bin.part").read_bytes() == BLOB[:1_500_000]

    server.cut_after = None
    status, _, err = sockd(capfd, "get", "--continue", server.address, "blob.bin")
    assert status == 0, err
    assert server.requests[-2:] == [b"GET blob.bin 1500000\r\n", b"SUM blob.bin\r\n"]
    assert (here / "blob.bin").read_bytes() == BLOB
    assert not (here / "blob.bin.part").exists()


def test_server_stalling_mid_body_times_out(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    # More than the first read takes with the answer line.
    server.cut_after = 100_000
    server.stall = True
    status, _, err = sockd(capfd, "get", "--timeout", "0.2", server.address, "blob.bin")
    assert status == fileproto.EXIT_CONNECT
    assert "receive failed: timed out" in err
    assert (here / "blob.bin.part").read_bytes() == BLOB[:100_000]


def test_empty_file(serve: Any, here: Path, capfd: Any) -> None:
    server = serve({b"empty": b""})
    status, _, err = sockd(capfd, "get", server.address, "empty")
    assert status == 0, err
    assert (here / "empty").read_bytes() == b""
    assert not (here / "empty.part").exists()


def test_output_directory_must_exist(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    status, _, err = sockd(capfd, "get", server.address, "hello.txt", "-o", "no/")
    assert status == fileproto.EXIT_USAGE
    assert "no such directory" in err
    assert server.requests == []


def test_continue_without_part_downloads_everything(
    serve: Any, here: Path, capfd: Any
) -> None:
    server = serve(FILES)
    status, _, err = sockd(capfd, "get", "-c", server.address, "hello.txt")
    assert status == 0, err
    assert server.requests[0] == b"GET hello.txt\r\n"
    assert (here / "hello.txt").read_bytes() == b"hello, world\n"


def test_continue_of_a_complete_part(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    (here / "hello.txt.part").write_bytes(b"hello, world\n")
    status, _, err = sockd(capfd, "get", "-c", server.address, "hello.txt")
    assert status == 0, err
    assert server.requests[0] == b"GET hello.txt 13\r\n"
    assert (here / "hello.txt").read_bytes() == b"hello, world\n"


def test_continue_with_a_wrong_prefix_fails_verification(
    serve: Any, here: Path, capfd: Any
) -> None:
    server = serve(FILES)
    (here / "hello.txt.part").write_bytes(b"HELLO")
    status, _, err = sockd(capfd, "get", "-c", server.address, "hello.txt")
    assert status == fileproto.EXIT_VERIFY
    assert "SHA-256 mismatch" in err
    assert "data kept in hello.txt.part" in err
    assert (here / "hello.txt.part").read_bytes() == b"HELLO, world\n"
    assert not (here / "hello.txt").exists()


def test_continue_with_a_longer_part(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    (here / "hello.txt.part").write_bytes(b"x" * 100)
    status, _, err = sockd(capfd, "get", "-c", server.address, "hello.txt")
    assert status == fileproto.EXIT_SERVER
    assert "server error 416" in err
    assert "longer than the remote file" in err
    assert (here / "hello.txt.part").read_bytes() == b"x" * 100


def test_continue_refuses_a_symlinked_part(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    (here / "precious").write_bytes(b"keep")
    (here / "hello.txt.part").symlink_to(here / "precious")
    status, _, err = sockd(capfd, "get", "-c", server.address, "hello.txt")
    assert status == 1
    assert "cannot resume" in err
    assert (here / "precious").read_bytes() == b"keep"
    assert server.requests == []


def test_checksum_mismatch_has_its_own_status(
    serve: Any, here: Path, capfd: Any
) -> None:
    server = serve(FILES)
    server.sum_override = "0" * 64
    status, _, err = sockd(capfd, "get", server.address, "hello.txt")
    assert status == fileproto.EXIT_VERIFY == 6
    assert f"received {HELLO_SUM}" in err
    assert not (here / "hello.txt").exists()
    assert (here / "hello.txt.part").read_bytes() == b"hello, world\n"


def test_file_changed_during_the_download(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    server.mtime_step = 1
    status, _, err = sockd(capfd, "get", server.address, "hello.txt")
    assert status == fileproto.EXIT_VERIFY
    assert "changed during the download" in err
    assert not (here / "hello.txt").exists()


def test_checksum_mismatch_on_stdout(serve: Any, here: Path, capfdbinary: Any) -> None:
    server = serve(FILES)
    server.sum_override = "f" * 64
    assert main(["get", server.address, "hello.txt", "-o", "-"]) == 6
    out, err = capfdbinary.readouterr()
    assert out == b"hello, world\n"
    assert b"SHA-256 mismatch" in err


@pytest.mark.parametrize(
    ("code", "status"),
    [(400, 7), (403, 5), (404, 4), (405, 7), (414, 7), (429, 3), (500, 7), (503, 3)],
)
def test_err_codes_map_to_exit_statuses(
    serve: Any, here: Path, capfd: Any, code: int, status: int
) -> None:
    server = serve(FILES)
    server.errors["GET"] = (code, "no\x1b[2J way")
    (here / "other").write_bytes(b"user file")
    got, _, err = sockd(capfd, "get", server.address, "hello.txt")
    assert got == status
    assert f"server error {code}: no\\x1b[2J way" in err
    assert "\x1b" not in err
    # Nothing created, nothing removed.
    assert sorted(os.listdir(here)) == ["other"]


def test_not_found_end_to_end(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    status, _, err = sockd(capfd, "get", server.address, "missing")
    assert status == fileproto.EXIT_NOT_FOUND
    assert os.listdir(here) == []


def test_connection_refused(here: Path, capfd: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        # Bound, not listening: connecting is refused.
        status, _, err = sockd(capfd, "get", f"127.0.0.1:{port}", "x")
    assert status == fileproto.EXIT_CONNECT
    assert "cannot connect" in err
    assert os.listdir(here) == []


def test_silent_server_times_out(here: Path, capfd: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        status, _, err = sockd(
            capfd, "stat", "--timeout", "0.2", f"127.0.0.1:{port}", "x"
        )
    assert status == fileproto.EXIT_CONNECT
    assert "timed out" in err


@pytest.mark.parametrize(
    "raw",
    [
        b"HELLO\r\n",
        b"OK lots size=1 mtime=2\r\n",
        b"OK 99 size=3 mtime=2\r\n",
        b"x" * 10_000,
        b"ERR nope\r\n",
    ],
)
def test_protocol_violations(serve: Any, here: Path, capfd: Any, raw: bytes) -> None:
    server = serve(FILES)
    server.raw_answer = raw
    status, _, err = sockd(capfd, "get", server.address, "hello.txt")
    assert status == fileproto.EXIT_SERVER, err
    assert os.listdir(here) == []


def test_server_closing_before_answering(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    server.raw_answer = b""
    status, _, err = sockd(capfd, "ls", server.address)
    assert status == fileproto.EXIT_CONNECT
    assert "server closed the connection" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["get"],
        ["get", "host"],
        ["get", "host:99999", "x"],
        ["get", ":8898", "x"],
        ["get", "--timeout", "0", "host", "x"],
        ["get", "host", ""],
        ["get", "host", "/"],
        ["get", "host", "x", "-o", "-", "--continue"],
        ["put", "host", "file", ".."],
        ["ls", "127.0.0.1:1", "--cafile", "/nonexistent/ca.pem"],
    ],
)
def test_usage_errors(here: Path, capfd: Any, argv: list[str]) -> None:
    status, _, err = sockd(capfd, *argv)
    assert status == fileproto.EXIT_USAGE, err
    assert err


def test_help_documents_exit_statuses(capfd: Any) -> None:
    for command in ("get", "ls", "stat", "put"):
        status, out, _ = sockd(capfd, command, "--help")
        assert status == 0
        assert "exit status:" in out
        assert "6    verification failure" in out
        assert ("protocols:" in out) == (command == "get")
    status, out, _ = sockd(capfd, "get", "--help")
    text = " ".join(out.split())
    assert "--continue resumes, the SHA-256 is always verified" in text
    assert "no resume (Gopher has no offsets), no checksum" in text
    assert "--continue resumes (Range; If-Range" in text
    assert "verified only if the server sends Repr-Digest or Digest" in text
    assert "--cafile PATH, --cacert PATH" in text


# ls and stat --------------------------------------------------------------


def test_ls_root(serve: Any, capfd: Any) -> None:
    server = serve(FILES)
    status, out, err = sockd(capfd, "ls", server.address)
    assert status == 0, err
    assert out.splitlines() == [
        "blob.bin",
        "docs/",
        "esc\\x1b[31mred",
        "hello.txt",
        "with space %.txt",
    ]
    assert server.requests == [b"LIST\r\n"]


def test_ls_long_subdirectory(serve: Any, capfd: Any) -> None:
    server = serve(FILES)
    status, out, _ = sockd(capfd, "ls", "-l", server.address, "docs")
    assert status == 0
    assert out.splitlines() == [
        "f              8 2025-11-24 16:00 README.txt",
        "d           4096 2025-11-24 16:00 deep/",
    ]


def test_ls_truncated(serve: Any, capfd: Any) -> None:
    """The server's truncation line is no entry: the user is told on stderr."""
    server = serve(FILES)
    server.truncated = "more than 10000 entries"
    status, out, err = sockd(capfd, "ls", server.address, "docs")
    assert status == 0
    assert out.splitlines() == ["README.txt", "deep/"]
    assert err == (
        "sockd ls: the server listed only part of the directory: "
        "more than 10000 entries\n"
    )


def test_ls_missing_directory(serve: Any, capfd: Any) -> None:
    server = serve(FILES)
    status, _, err = sockd(capfd, "ls", server.address, "nope dir")
    assert status == fileproto.EXIT_NOT_FOUND
    assert server.requests == [b"LIST nope%20dir\r\n"]


def test_ls_a_file_shows_it_as_ls_does(serve: Any, capfd: Any) -> None:
    server = serve(FILES)
    status, out, err = sockd(capfd, "ls", server.address, "hello.txt")
    assert (status, out, err) == (0, "hello.txt\n", "")
    assert server.requests == [b"LIST hello.txt\r\n", b"STAT hello.txt\r\n"]
    status, out, _ = sockd(capfd, "ls", "-l", server.address, "docs/README.txt")
    assert out == "f              8 2025-11-24 16:00 docs/README.txt\n"
    status, out, _ = sockd(capfd, "ls", "-lh", server.address, "blob.bin")
    assert out == "f  3.0M 2025-11-24 16:00 blob.bin\n"


def test_ls_long_human_sizes(serve: Any, capfd: Any) -> None:
    server = serve(FILES)
    status, out, _ = sockd(capfd, "ls", "-l", "-h", server.address)
    assert status == 0
    assert out.splitlines()[:2] == [
        "f  3.0M 2025-11-24 16:00 blob.bin",
        "d  4.0K 2025-11-24 16:00 docs/",
    ]
    # -h alone, as in ls(1), changes nothing; help is --help.
    assert sockd(capfd, "ls", "-h", server.address)[1].splitlines()[0] == "blob.bin"
    status, out, _ = sockd(capfd, "ls", "--help")
    assert status == 0 and "-h, --human-readable" in out


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0"),
        (1023, "1023"),
        (1024, "1.0K"),
        (1025, "1.1K"),  # rounded up, as ls -lh does
        (1536, "1.5K"),
        (10239, "10K"),
        (10241, "11K"),
        (1048575, "1.0M"),
        (1048577, "1.1M"),
        (5_000_000_000, "4.7G"),
        (1024**4, "1.0T"),
    ],
)
def test_human_size_as_gnu_ls(size: int, shown: str) -> None:
    assert human_size(size) == shown


def test_stat_file_with_sum(serve: Any, capfd: Any) -> None:
    server = serve(FILES)
    status, out, _ = sockd(capfd, "stat", "--sum", server.address, "hello.txt")
    assert status == 0
    assert out.splitlines() == [
        "path:   hello.txt",
        "type:   file",
        "size:   13",
        f"mtime:  {MTIME} (2025-11-24 16:00 UTC)",
        f"sha256: {HELLO_SUM}",
    ]


def test_stat_directory(serve: Any, capfd: Any) -> None:
    server = serve(FILES)
    status, out, _ = sockd(capfd, "stat", "--sum", server.address, "docs")
    assert status == 0
    assert "type:   dir" in out and "sha256" not in out
    assert server.requests == [b"STAT docs\r\n"]


# put ----------------------------------------------------------------------


def test_put_uploads_and_checks_the_digest(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    server.writable = True
    (here / "up load.bin").write_bytes(BLOB[:2_500_000])
    status, _, err = sockd(capfd, "put", server.address, "up load.bin", "docs/")
    assert status == 0, err
    assert server.requests[0] == b"PUT docs/up%20load.bin 2500000\r\n"
    assert server.files[b"docs/up load.bin"] == BLOB[:2_500_000]


def test_put_default_remote_name(serve: Any, here: Path, capfd: Any) -> None:
    server = serve({})
    server.writable = True
    (here / "sub").mkdir()
    (here / "sub" / "n.txt").write_bytes(b"")
    status, _, err = sockd(capfd, "put", server.address, "sub/n.txt")
    assert status == 0, err
    assert server.files == {b"n.txt": b""}


def test_put_forbidden(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    (here / "f").write_bytes(b"data")
    status, _, err = sockd(capfd, "put", server.address, "f")
    assert status == fileproto.EXIT_FORBIDDEN
    assert "403" in err


@pytest.mark.parametrize(
    ("remote", "error", "status", "said"),
    [
        (
            "no/such/f",
            (404, "not found"),
            4,
            "no such directory: no/such (server error 404: not found)",
        ),
        (
            "sub/.secret",
            (403, "hidden: hidden files are not served"),
            5,
            "hidden names are refused by the server: .secret "
            "(server error 403: hidden files are not served)",
        ),
        (
            ".git/config",
            (403, "hidden: hidden files are not served"),
            5,
            "hidden names are refused by the server: .git "
            "(server error 403: hidden files are not served)",
        ),
        # The cause decides, never the reason's words.
        (
            ".env",
            (403, "hidden files are not served"),
            5,
            "server error 403: hidden files are not served",
        ),
        (
            ".env",
            (403, "private: a cause no client knows yet"),
            5,
            "server error 403: private: a cause no client knows yet",
        ),
        # Another 403 is said as the server says it, hidden name or not.
        (
            ".x",
            (403, "this server does not accept uploads"),
            5,
            "server error 403: this server does not accept uploads",
        ),
        (
            "f",
            (403, "readonly: this server does not accept uploads"),
            5,
            "the server does not accept uploads "
            "(server error 403: this server does not accept uploads)",
        ),
        (
            "f",
            (403, "unauthorised: uploads are not allowed from 192.0.2.7"),
            5,
            "the server does not let this client upload: use --cert FILE --key "
            "FILE with a certificate it accepts, or a network it allows "
            "(server error 403: uploads are not allowed from 192.0.2.7)",
        ),
        ("f", (404, "not found"), 4, "server error 404: not found"),
    ],
)
def test_put_refusals_say_what_is_wrong(
    serve: Any,
    here: Path,
    capfd: Any,
    remote: str,
    error: tuple[int, str],
    status: int,
    said: str,
) -> None:
    server = serve(FILES)
    server.writable = True
    server.errors["PUT"] = error
    (here / "f").write_bytes(b"data")
    result = sockd(capfd, "put", server.address, "f", remote)
    assert result == (status, "", f"sockd put: {said}\n")


def test_put_digest_mismatch(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    server.writable = True
    server.sum_override = "a" * 64
    (here / "f").write_bytes(b"data")
    status, _, err = sockd(capfd, "put", server.address, "f")
    assert status == fileproto.EXIT_VERIFY
    assert "stored 4 bytes" in err


def test_put_refuses_non_regular_files(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    os.mkfifo(here / "fifo")
    for local in ("fifo", ".", "missing"):
        status, _, err = sockd(capfd, "put", server.address, local, "x")
        assert status == 1, err
    assert server.requests == []


# TLS ----------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def server_pem(
    pem: Path,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    names: list[x509.GeneralName],
) -> Path:
    """Write a key and a certificate for C{names}, signed by C{ca}, to C{pem}."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("sockd test server"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    return pem


def _server_context(
    tmp: Path,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    names: list[x509.GeneralName],
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_pem(tmp / "server.pem", ca, names))
    return context


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = make_ca("sockd test CA")
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    local = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    return {
        "cafile": str(cafile),
        "good": _server_context(tmp_path, ca, local),
        "wrong_name": _server_context(tmp_path, ca, [x509.DNSName("files.example")]),
        "other_ca": _server_context(tmp_path, make_ca("someone else"), local),
    }


def test_tls_get_with_cafile(
    serve: Any, here: Path, capfd: Any, pki: dict[str, Any]
) -> None:
    server = serve(FILES, tls=pki["good"])
    status, _, err = sockd(
        capfd, "get", "--cafile", pki["cafile"], server.address, "blob.bin"
    )
    assert status == 0, err
    assert (here / "blob.bin").read_bytes() == BLOB
    port = server.server_address[1]
    status, out, err = sockd(
        capfd, "ls", "--tls", "--cafile", pki["cafile"], f"localhost:{port}"
    )
    assert status == 0, err
    assert "hello.txt" in out.splitlines()


def test_tls_wrong_hostname(
    serve: Any, here: Path, capfd: Any, pki: dict[str, Any]
) -> None:
    server = serve(FILES, tls=pki["wrong_name"])
    status, _, err = sockd(
        capfd, "get", "--cafile", pki["cafile"], server.address, "hello.txt"
    )
    assert status == fileproto.EXIT_VERIFY
    assert "certificate not accepted" in err and "mismatch" in err
    assert server.requests == []
    assert os.listdir(here) == ["ca.pem", "server.pem"]


def test_tls_unknown_ca(serve: Any, capfd: Any, pki: dict[str, Any]) -> None:
    server = serve(FILES, tls=pki["other_ca"])
    status, _, err = sockd(capfd, "ls", "--cafile", pki["cafile"], server.address)
    assert status == fileproto.EXIT_VERIFY
    assert "unable to get local issuer certificate" in err
    # Nor does the system store know this CA.
    status, _, err = sockd(capfd, "ls", "--tls", server.address)
    assert status == fileproto.EXIT_VERIFY
    assert server.requests == []


def test_tls_to_a_plain_server(serve: Any, capfd: Any, pki: dict[str, Any]) -> None:
    server = serve(FILES)
    server.greeting = b"ERR 400 bad request\r\n"
    status, _, err = sockd(
        capfd, "ls", "--timeout", "5", "--cafile", pki["cafile"], server.address
    )
    assert status == fileproto.EXIT_CONNECT
    assert "TLS handshake failed" in err


# Pipeline and local failures ----------------------------------------------


@pytest.mark.skipif(
    not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux only"
)
def test_answer_lines_are_acknowledged_at_once() -> None:
    # Else a server writing "OK ..." then a small body under Nagle's
    # algorithm waits for the delayed ACK: 40 ms per file of a tree.
    client, server = socket.socketpair(socket.AF_UNIX)
    options: list[tuple[int, int, int]] = []

    class Recording:
        def recv_into(self, view: memoryview) -> int:
            return client.recv_into(view)

        def setsockopt(self, level: int, name: int, value: int) -> None:
            options.append((level, name, value))

    with client, server:
        connection = fileproto.Connection(Recording(), "test")  # type: ignore[arg-type]
        server.sendall(b"OK 3 size=3 mtime=1\r\nabc")
        assert connection.readline() == b"OK 3 size=3 mtime=1"
    assert options == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)]


def test_pipeline_consumes_in_order() -> None:
    got = bytearray()
    with fileproto.Pipeline(got.extend, depth=2) as pipeline:
        for i in range(50):
            view = pipeline.take()
            assert len(view) == fileproto.CHUNK
            view[:3] = bytes((i, i, i))
            pipeline.give(view[:3])
        pipeline.close()
    assert got == b"".join(bytes((i, i, i)) for i in range(50))


def test_pipeline_reports_consumer_errors() -> None:
    def consume(data: memoryview) -> None:
        raise OSError(28, "No space left on device")

    with fileproto.Pipeline(consume, depth=2) as pipeline:
        pipeline.give(pipeline.take()[:1])
        with pytest.raises(OSError, match="No space"):
            # The failed chunk's buffer comes back, then the error with it.
            for _ in range(3):
                pipeline.give(pipeline.take()[:1])
        with pytest.raises(OSError, match="No space"):
            pipeline.close()


def test_pipeline_exit_stops_the_worker_on_error() -> None:
    pipeline = fileproto.Pipeline(lambda data: None)
    with pytest.raises(RuntimeError), pipeline:
        pipeline.give(pipeline.take()[:10])
        raise RuntimeError("receive failed")
    assert not pipeline._thread.is_alive()


def test_get_local_write_failure(
    serve: Any, here: Path, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(FILES)

    def full(fd: int, view: memoryview) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output, "write_all", full)
    status, _, err = sockd(capfd, "get", server.address, "blob.bin")
    assert status == 1
    assert "blob.bin.part: cannot write: No space left on device" in err
    # The empty file this run created is gone; nothing else was touched.
    assert os.listdir(here) == []


def test_get_file_mode_follows_umask(serve: Any, here: Path, capfd: Any) -> None:
    server = serve(FILES)
    old = os.umask(0o027)
    try:
        status, _, _ = sockd(capfd, "get", server.address, "hello.txt")
    finally:
        os.umask(old)
    assert status == 0
    assert (here / "hello.txt").stat().st_mode & 0o777 == 0o640


def _with_tty_stderr(
    argv: list[str],
    cwd: Path,
    interrupt_after: re.Pattern[bytes] | None = None,
    columns: int = 0,
) -> tuple[int, bytes]:
    """
    Run the real command with a pseudo-terminal (C{columns} wide, or of
    unknown size) as stderr; send it SIGINT once that shows something
    matching C{interrupt_after}.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sockd.client.main", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            cwd=cwd,
        )
        os.close(slave)
        chunks = []
        while True:
            ready, _, _ = select.select([master], [], [], 20)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
            if interrupt_after is not None and interrupt_after.search(b"".join(chunks)):
                process.send_signal(signal.SIGINT)
                interrupt_after = None
        return process.wait(20), b"".join(chunks)
    finally:
        os.close(master)


def test_progress_bar_on_a_terminal_only(serve: Any, here: Path) -> None:
    server = serve(FILES)
    status, text = _with_tty_stderr(["get", server.address, "blob.bin"], here)
    assert status == 0
    # tqdm's bar, redrawn in place; the final one stays.
    assert b"\rblob.bin: 100%" in text and b"3.00M/3.00M" in text
    assert text.endswith(b"\r\n") and b"\x1b[" not in text
    status, text = _with_tty_stderr(
        ["get", "-q", server.address, "blob.bin", "-o", "copy"], here
    )
    assert (status, text) == (0, b"")
    assert (here / "copy").read_bytes() == BLOB


def test_progress_bar_fits_a_narrow_terminal(serve: Any, here: Path) -> None:
    server = serve(FILES)
    argv = ["get", server.address, "blob.bin"]
    status, text = _with_tty_stderr(argv, here, columns=40)
    assert status == 0
    lines = [line for line in re.split(rb"[\r\n]+", text) if line]
    assert lines and lines[-1].startswith(b"blob.bin: 100%")
    # The last column stays free: a full line would wrap on some terminals.
    assert all(len(line.decode()) <= 39 for line in lines), lines


def test_install_never_replaces_a_file_that_appeared(tmp_path: Path) -> None:
    part, target = tmp_path / "f.part", tmp_path / "f"
    part.write_bytes(b"new")
    target.write_bytes(b"theirs")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(fileproto.ClientError, match="appeared during the download"):
            output.install(fd, "f.part", "f", False, str(target))
        assert (part.read_bytes(), target.read_bytes()) == (b"new", b"theirs")
        output.install(fd, "f.part", "f", True, str(target))
    finally:
        os.close(fd)
    assert target.read_bytes() == b"new" and not part.exists()


def test_interrupt_keeps_the_part_file(serve: Any, here: Path) -> None:
    server = serve(FILES)
    server.cut_after = 1_500_000
    server.stall = True
    # Once the bar shows bytes received (how many depends on the kernel's
    # reads), the server stalls and the client is interrupted.
    status, text = _with_tty_stderr(
        ["get", server.address, "blob.bin"],
        here,
        interrupt_after=re.compile(rb"[kM]/3\.00M"),
    )
    assert status == fileproto.EXIT_INTERRUPTED
    assert text.endswith(
        b"\r\nsockd get: interrupted\r\n"
        b"sockd get: partial data kept in blob.bin.part: resume with --continue\r\n"
    )
    kept = (here / "blob.bin.part").read_bytes()
    assert kept and BLOB.startswith(kept)
    assert not (here / "blob.bin").exists()
