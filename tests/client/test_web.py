"""
Tests for C{sockd get http://|https://} (sockd.client.web) against a small
threaded HTTP server on 127.0.0.1 that answers what each test scripts.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import ipaddress
import ssl
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sockd.client import web
from sockd.client.fileproto import ProtocolError
from tests.client.test_files import (
    BLOB,
    _server_context,
    make_ca,
    sockd,
    threaded_servers,
)

Answer = tuple[int, dict[str, str], bytes]


class Handler(http.server.BaseHTTPRequestHandler):
    server: FakeHTTP
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.seen.append((self.path, dict(self.headers.items())))
        route = srv.routes.get(self.path)
        if route is None:
            self._answer(404, {}, b"no such thing\n")
            return
        status, headers, body = route(self) if callable(route) else route
        if status == -1:  # cut: announce the length, send half, close
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self._answer(status, headers, body)

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        chunked = headers.pop("Transfer-Encoding", None) == "chunked"
        for name, value in headers.items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if chunked:
            for i in range(0, len(body), 100_000):
                piece = body[i : i + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)


class FakeHTTP(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Answer | Callable[[Handler], Answer]] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.server_address[1]}{path}"


@pytest.fixture
def web_server() -> Iterator[Callable[..., FakeHTTP]]:
    yield from threaded_servers(FakeHTTP)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def repr_digest(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


def ranged(data: bytes, etag: str) -> Callable[[Handler], Answer]:
    """Answers like a static file server: Range, If-Range, ETag."""

    def answer(request: Handler) -> Answer:
        headers = {"ETag": etag, "Repr-Digest": repr_digest(data)}
        wanted = request.headers.get("Range", "")
        if_range = request.headers.get("If-Range")
        if wanted.startswith("bytes=") and if_range in (None, etag):
            start = int(wanted[6:].rstrip("-"))
            if start >= len(data):
                return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return 206, headers, data[start:]
        return 200, headers, data

    return answer


# Downloads -----------------------------------------------------------------


def test_get_verifies_repr_digest(web_server: Any, here: Path, capfd: Any) -> None:
    server = web_server()
    server.routes["/d/blob.bin"] = (200, {"Repr-Digest": repr_digest(BLOB)}, BLOB)
    status, out, err = sockd(capfd, "get", server.url("/d/blob.bin"))
    assert (status, out, err) == (0, "", "")
    assert (here / "blob.bin").read_bytes() == BLOB
    path, headers = server.seen[0]
    assert path == "/d/blob.bin"
    assert headers["Host"] == f"127.0.0.1:{server.server_address[1]}"
    assert headers["User-Agent"].startswith("sockd/")
    assert "Range" not in headers
    assert sorted(p.name for p in here.iterdir()) == ["blob.bin"]


def test_digest_mismatch_keeps_the_part(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    digest = "SHA-256=" + base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    server.routes["/f"] = (200, {"Digest": digest}, b"data")
    status, _, err = sockd(capfd, "get", server.url("/f"))
    assert status == 6
    assert "SHA-256 mismatch" in err
    assert "data kept in f.part" in err
    assert (here / "f.part").read_bytes() == b"data"
    assert not (here / "f").exists()


def test_without_a_digest_nothing_is_checked(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    server.routes["/f"] = (200, {"Transfer-Encoding": "chunked"}, BLOB)
    status, _, err = sockd(capfd, "get", server.url("/f"), "-o", "out")
    assert (status, err) == (0, "")
    assert (here / "out").read_bytes() == BLOB


def test_to_stdout(web_server: Any, here: Path, capfdbinary: Any) -> None:
    server = web_server()
    server.routes["/f.txt"] = (200, {}, b"to stdout\n")
    from sockd.client.main import main

    assert main(["get", server.url("/f.txt"), "-o", "-"]) == 0
    assert capfdbinary.readouterr() == (b"to stdout\n", b"")
    assert list(here.iterdir()) == []


def test_resume_sends_range_and_if_range(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    server.routes["/blob.bin"] = ranged(BLOB, '"v1"')
    (here / "blob.bin.part").write_bytes(BLOB[:1_234_567])
    (here / "blob.bin.part.meta").write_text('If-Range: "v1"\n')
    status, _, err = sockd(capfd, "get", "-c", server.url("/blob.bin"))
    assert (status, err) == (0, "")
    headers = server.seen[0][1]
    assert headers["Range"] == "bytes=1234567-"
    assert headers["If-Range"] == '"v1"'
    assert (here / "blob.bin").read_bytes() == BLOB
    assert sorted(p.name for p in here.iterdir()) == ["blob.bin"]


def test_cut_download_keeps_part_and_validator_then_resumes(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    cut = {"on": True}

    def answer(request: Handler) -> Answer:
        if cut["on"]:
            return -1, {"ETag": '"v1"'}, BLOB
        return ranged(BLOB, '"v1"')(request)

    server.routes["/blob.bin"] = answer
    status, _, err = sockd(capfd, "get", server.url("/blob.bin"))
    assert status == 3, err
    half = len(BLOB) // 2
    assert f"connection closed after {half} of {len(BLOB)} bytes" in err
    assert "partial data kept in blob.bin.part: resume with --continue" in err
    assert (here / "blob.bin.part").read_bytes() == BLOB[:half]
    assert (here / "blob.bin.part.meta").read_text() == 'If-Range: "v1"\n'
    cut["on"] = False
    status, _, err = sockd(capfd, "get", "-c", server.url("/blob.bin"))
    assert (status, err) == (0, "")
    assert server.seen[-1][1]["Range"] == f"bytes={half}-"
    assert server.seen[-1][1]["If-Range"] == '"v1"'
    assert (here / "blob.bin").read_bytes() == BLOB
    assert sorted(p.name for p in here.iterdir()) == ["blob.bin"]


def test_malformed_digest_writes_nothing(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    server.routes["/f"] = (200, {"ETag": '"abc"', "Repr-Digest": "sha-256=:x:"}, b"d")
    status, _, err = sockd(capfd, "get", server.url("/f"))
    assert status == 7, err
    assert "Repr-Digest: bad sha-256 value" in err
    assert list(here.iterdir()) == []


def test_no_validator_left_without_its_part(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    server.routes["/f"] = (-1, {"ETag": '"v"'}, b"x")
    status, _, err = sockd(capfd, "get", "--timeout", "5", server.url("/f"))
    # Cut before the first byte: the empty .part goes, and its validator.
    assert status == 3, err
    assert list(here.iterdir()) == []


def test_changed_file_comes_back_whole(web_server: Any, here: Path, capfd: Any) -> None:
    server = web_server()
    server.routes["/blob.bin"] = ranged(BLOB, '"v2"')
    (here / "blob.bin.part").write_bytes(b"an older version")
    (here / "blob.bin.part.meta").write_text('If-Range: "v1"\n')
    status, _, err = sockd(capfd, "get", "-c", server.url("/blob.bin"))
    assert status == 0, err
    assert "sent the whole file (it changed, or cannot resume)" in err
    assert (here / "blob.bin").read_bytes() == BLOB
    assert not (here / "blob.bin.part.meta").exists()


def test_bad_whole_answer_keeps_the_part(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    server.routes["/f"] = (200, {"Digest": "SHA-256=bad"}, b"whole file")
    (here / "f.part").write_bytes(b"whole")
    status, _, err = sockd(capfd, "get", "-c", server.url("/f"))
    assert status == 7, err
    assert (here / "f.part").read_bytes() == b"whole"


def test_server_ignoring_ranges_restarts_safely(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    server.routes["/f"] = (200, {}, b"whole file")
    (here / "f.part").write_bytes(b"whole")
    status, _, err = sockd(capfd, "get", "-c", server.url("/f"))
    assert status == 0, err
    assert (here / "f").read_bytes() == b"whole file"


def test_complete_part_and_longer_part(web_server: Any, here: Path, capfd: Any) -> None:
    server = web_server()
    server.routes["/f"] = ranged(b"12345", '"e"')
    (here / "f.part").write_bytes(b"12345")
    status, _, err = sockd(capfd, "get", "-c", server.url("/f"))
    assert (status, err) == (0, "")
    assert (here / "f").read_bytes() == b"12345"
    (here / "g.part").write_bytes(b"1234567")
    server.routes["/g"] = ranged(b"12345", '"e"')
    status, _, err = sockd(capfd, "get", "-c", server.url("/g"))
    assert status == 7
    assert "server error 416" in err and "longer than the remote file" in err
    assert (here / "g.part").read_bytes() == b"1234567"


@pytest.mark.parametrize(
    "content_range",
    ["bytes 0-4/10", "bytes 3-4/10", "bytes 5-4/10", "bytes 5-10/10", "pages 5-9/10"],
)
def test_bad_partial_answers(
    web_server: Any, here: Path, capfd: Any, content_range: str
) -> None:
    server = web_server()
    server.routes["/f"] = (206, {"Content-Range": content_range}, b"xxxxx")
    (here / "f.part").write_bytes(b"12345")
    status, _, err = sockd(capfd, "get", "-c", server.url("/f"))
    assert status == 7, err
    assert (here / "f.part").read_bytes() == b"12345"


def test_partial_answer_to_a_whole_request(
    web_server: Any, here: Path, capfd: Any
) -> None:
    server = web_server()
    server.routes["/f"] = (206, {"Content-Range": "bytes 0-4/10"}, b"xxxxx")
    status, _, err = sockd(capfd, "get", server.url("/f"))
    assert status == 7
    assert "206 partial answer to a request for the whole file" in err
    assert list(here.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "status"),
    [(404, 4), (410, 7), (401, 5), (403, 5), (429, 3), (500, 7), (503, 3), (204, 7)],
)
def test_status_codes_map_to_exit_statuses(
    web_server: Any, here: Path, capfd: Any, code: int, status: int
) -> None:
    server = web_server()
    server.routes["/f"] = (code, {}, b"")
    got, _, err = sockd(capfd, "get", server.url("/f"))
    assert got == status, err
    assert f"server error {code}" in err
    assert list(here.iterdir()) == []


# Redirects -------------------------------------------------------------------


def test_redirects_are_followed(web_server: Any, here: Path, capfd: Any) -> None:
    server = web_server()
    other = web_server()
    server.routes["/a"] = (301, {"Location": "/b"}, b"")
    server.routes["/b"] = (302, {"Location": other.url("/c")}, b"")
    other.routes["/c"] = (200, {}, b"at last")
    status, _, err = sockd(capfd, "get", server.url("/a"))
    assert (status, err) == (0, "")
    # Named after what was asked for, not where it led.
    assert (here / "a").read_bytes() == b"at last"


def test_at_most_five_redirects(web_server: Any, here: Path, capfd: Any) -> None:
    server = web_server()
    for i in range(6):
        server.routes[f"/{i}"] = (307, {"Location": f"/{i + 1}"}, b"")
    server.routes["/6"] = (200, {}, b"too far")
    server.routes["/5"] = (200, {}, b"far enough")
    status, _, err = sockd(capfd, "get", server.url("/0"))
    assert (status, err) == (0, "")
    assert (here / "0").read_bytes() == b"far enough"
    server.routes["/5"] = (308, {"Location": "/6"}, b"")
    status, _, err = sockd(capfd, "get", server.url("/0"), "-o", "again")
    assert status == 7
    assert "more than 5 redirects" in err


@pytest.mark.parametrize(
    "location", ["ftp://127.0.0.1/x", "file:///etc/passwd", "gopher://h/0/x", ""]
)
def test_redirects_elsewhere_are_refused(
    web_server: Any, here: Path, capfd: Any, location: str
) -> None:
    server = web_server()
    server.routes["/a"] = (302, {"Location": location} if location else {}, b"")
    status, _, err = sockd(capfd, "get", server.url("/a"))
    assert status == 7, err
    assert list(here.iterdir()) == []


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, ssl.SSLContext]:
    ca = make_ca("sockd web test CA")
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    return str(cafile), _server_context(tmp_path, ca, names)


def test_https_with_cacert_and_no_downgrade(
    web_server: Any,
    here: Path,
    capfd: Any,
    tls_files: tuple[str, ssl.SSLContext],
) -> None:
    cafile, context = tls_files
    secure = web_server(context)
    plain = web_server()
    plain.routes["/x"] = (200, {}, b"plain")
    secure.routes["/f"] = (200, {}, b"secret")
    secure.routes["/down"] = (302, {"Location": plain.url("/x")}, b"")
    url = secure.url("/f", "https", "localhost")
    status, _, err = sockd(capfd, "get", "--cacert", cafile, url, "-o", "f")
    assert (status, err) == (0, "")
    assert (here / "f").read_bytes() == b"secret"
    down = secure.url("/down", "https", "localhost")
    status, _, err = sockd(capfd, "get", "--cacert", cafile, down)
    assert status == 7
    assert "redirect from https:// to http:// refused" in err
    assert plain.seen == []
    # Unknown CA: the system store does not know it.
    status, _, err = sockd(capfd, "get", url, "-o", "g")
    assert status == 6
    assert "certificate not accepted" in err
    # http:// may be redirected up to https://.
    plain.routes["/up"] = (301, {"Location": url}, b"")
    status, _, err = sockd(capfd, "get", "--cafile", cafile, plain.url("/up"))
    assert (status, err) == (0, "")
    assert (here / "up").read_bytes() == b"secret"


# Header parsing ----------------------------------------------------------------


def headers(*pairs: tuple[str, str]) -> Message:
    message = Message()
    for name, value in pairs:
        message[name] = value
    return message


def test_expected_sha256() -> None:
    digest = hashlib.sha256(b"x").digest()
    b64 = base64.b64encode(digest).decode()
    assert web.expected_sha256(headers()) is None
    assert web.expected_sha256(headers(("Repr-Digest", f"sha-256=:{b64}:"))) == digest
    both = f"sha-512=:{base64.b64encode(bytes(64)).decode()}:, sha-256=:{b64}:"
    assert web.expected_sha256(headers(("Repr-Digest", both))) == digest
    assert web.expected_sha256(headers(("Digest", f"SHA-256={b64}"))) == digest
    assert web.expected_sha256(headers(("Digest", f"md5=xx, sha-256={b64}"))) == digest
    # Content-Digest covers one message's bytes, not the file: not used.
    assert web.expected_sha256(headers(("Content-Digest", f"sha-256=:{b64}:"))) is None
    for bad in (
        ("Repr-Digest", f"sha-256={b64}"),
        ("Repr-Digest", "sha-256=:AAAA:"),
        ("Digest", "SHA-256=not base64!"),
    ):
        with pytest.raises(ProtocolError):
            web.expected_sha256(headers(bad))
    other = base64.b64encode(hashlib.sha256(b"y").digest()).decode()
    with pytest.raises(ProtocolError, match="two different"):
        web.expected_sha256(
            headers(("Repr-Digest", f"sha-256=:{b64}:"), ("Digest", f"SHA-256={other}"))
        )


def test_content_range() -> None:
    assert web.content_range("bytes 5-9/10") == (5, 9, 10)
    assert web.content_range("bytes 5-9/*") == (5, 9, None)
    for bad in (None, "", "bytes 5-9", "bytes 9-5/10", "bytes 5-10/10", "bytes -1-2/3"):
        with pytest.raises(ProtocolError):
            web.content_range(bad)


def test_validator_prefers_a_strong_etag() -> None:
    date = "Tue, 01 Jul 2025 10:00:00 GMT"
    assert web.validator(headers(("ETag", '"a"'), ("Last-Modified", date))) == '"a"'
    assert web.validator(headers(("ETag", 'W/"a"'), ("Last-Modified", date))) == date
    assert web.validator(headers(("ETag", '"a\x01"'))) is None
    assert web.validator(headers()) is None
