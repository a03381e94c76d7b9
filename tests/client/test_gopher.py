"""
Tests for C{sockd get gopher://} (sockd.client.gopher) against a small
threaded Gopher server on 127.0.0.1 that answers what each test scripts.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockd.client.fileproto import EXIT_NOT_FOUND, EXIT_SERVER, ServerError
from sockd.client.gopher import MAX_ERROR, GopherError, answer_error
from sockd.client.main import main
from tests.client.test_files import BLOB, sockd, threaded_servers


class Handler(socketserver.StreamRequestHandler):
    server: FakeGopher

    def handle(self) -> None:
        line = self.rfile.readline(4096)
        self.server.requests.append(line)
        self.wfile.write(self.server.answers.get(line, b""))


class FakeGopher(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[bytes] = []
        #: request line -> whole answer (nothing if not listed)
        self.answers: dict[bytes, bytes] = {}

    def url(self, path: str) -> str:
        return f"gopher://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def gopher_server() -> Iterator[Callable[[], FakeGopher]]:
    yield from threaded_servers(FakeGopher)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_selector_request_like_curl(gopher_server: Any, here: Path, capfd: Any) -> None:
    server = gopher_server()
    server.answers[b"/docs/big file.bin\r\n"] = BLOB
    status, out, err = sockd(capfd, "get", server.url("/9/docs/big%20file.bin"))
    assert (status, out, err) == (0, "", "")
    assert server.requests == [b"/docs/big file.bin\r\n"]
    assert (here / "big file.bin").read_bytes() == BLOB
    assert sorted(p.name for p in here.iterdir()) == ["big file.bin"]


def test_root_menu_to_stdout(gopher_server: Any, capfdbinary: Any) -> None:
    server = gopher_server()
    menu = b"0hello.txt\t/hello.txt\t127.0.0.1\t70\r\n.\r\n"
    server.answers[b"\r\n"] = menu
    assert main(["get", server.url("/"), "-o", "-"]) == 0
    assert capfdbinary.readouterr() == (menu, b"")
    # A menu needs a name to be saved under.
    assert main(["get", server.url("/")]) == 2


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        (b"", EXIT_SERVER, "the server sent nothing"),
        (b"3'/x' not found\t\terror.host\t1\r\n.\r\n", EXIT_NOT_FOUND, "not found"),
        (b"3Not Found\terr\terror.host\t1\r\n", EXIT_NOT_FOUND, "Not Found"),
        (b"3404 no such file\t\terror.host\t1\r\n.\r\n", 4, "server error 404"),
        (b"3ERR 403 forbidden\t\th\t1\r\n", 5, "server error 403: forbidden"),
        (b"3server on fire\t\terror.host\t1\r\n.\r\n", EXIT_SERVER, "on fire"),
        (b"ERR 404 not found\r\n", 4, "server error 404: not found"),
        (b"ERR 403 hidden: hidden files are not served\r\n", 5, "server error 403"),
        (b"3esc \x1b[2J\t\th\t1\r\n", EXIT_SERVER, "esc \\x1b[2J"),
    ],
)
def test_error_answers(
    gopher_server: Any,
    here: Path,
    capfd: Any,
    answer: bytes,
    status: int,
    message: str,
) -> None:
    server = gopher_server()
    server.answers[b"/x\r\n"] = answer
    got, _, err = sockd(capfd, "get", server.url("/0/x"))
    assert got == status, err
    assert message in err
    assert "\x1b" not in err
    assert list(here.iterdir()) == []


def test_content_that_only_looks_like_an_error(
    gopher_server: Any, here: Path, capfd: Any
) -> None:
    server = gopher_server()
    long_item = b"3\tthis\tlooks\tlike an error item\r\n" * 200
    assert len(long_item) > MAX_ERROR
    server.answers[b"/a\r\n"] = long_item
    server.answers[b"/b\r\n"] = b"3 apples\n2 pears\n"
    assert sockd(capfd, "get", server.url("/0/a"))[0] == 0
    assert sockd(capfd, "get", server.url("/0/b"))[0] == 0
    assert (here / "a").read_bytes() == long_item
    assert (here / "b").read_bytes() == b"3 apples\n2 pears\n"


def test_existing_files_and_no_resume(
    gopher_server: Any, here: Path, capfd: Any
) -> None:
    server = gopher_server()
    server.answers[b"/x\r\n"] = b"new"
    (here / "x").write_bytes(b"mine")
    status, _, err = sockd(capfd, "get", server.url("/0/x"))
    assert status == 1 and "x exists: use --force" in err
    (here / "x.part").write_bytes(b"old")
    status, _, err = sockd(capfd, "get", "-f", server.url("/0/x"))
    assert status == 1 and "x.part exists" in err
    status, _, err = sockd(capfd, "get", "-c", "-f", server.url("/0/x"))
    assert status == 2 and "Gopher has no offsets" in err
    (here / "x.part").unlink()
    status, _, err = sockd(capfd, "get", "-f", server.url("/0/x"))
    assert (status, err) == (0, "")
    assert (here / "x").read_bytes() == b"new"
    assert server.requests == [b"/x\r\n"]


def test_cut_download_leaves_no_part(here: Path, capfd: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_then_reset() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(BLOB[:100_000])
                # An abortive close: the client sees a reset, not an end.
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )

        thread = threading.Thread(target=serve_then_reset)
        thread.start()
        status, _, err = sockd(
            capfd, "get", "--timeout", "5", f"gopher://127.0.0.1:{port}/9/f"
        )
        thread.join(10)
    assert status == 3, err
    # A Gopher download cannot be resumed: nothing is kept.
    assert list(here.iterdir()) == []


def test_answer_error_table() -> None:
    assert isinstance(answer_error(b""), GopherError)
    assert answer_error(b"plain text\n") is None
    assert answer_error(b"3\n") is None  # no tab: not a menu line
    assert answer_error(b"3x\ty\th\t1\r\nnot a menu line\r\n") is None
    error = answer_error(b"3gone\t\th\t1\r\niinfo\t\th\t1\r\n.\r\n")
    assert isinstance(error, GopherError) and error.status == EXIT_SERVER
    error = answer_error(b"ERR 416 offset\r\n")
    assert isinstance(error, ServerError) and error.code == 416
