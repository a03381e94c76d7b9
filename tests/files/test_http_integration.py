"""
Integration tests: HTTP on a real C{twistd -n sockd-file}, with the clients
people use: curl (ranges, resume, conditionals, uploads), wget (resume) and
headless Chromium (a directory index, drawn and read).  One daemon serves
them all, on the shared port and on C{listen_http}.
"""

from __future__ import annotations

import email.utils
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Daemon, need, run_tool, running

pytestmark = pytest.mark.integration

BIG = 3 * 1024 * 1024 + 7


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("http") / "files"
    root.mkdir()
    (root / "notes.txt").write_bytes(b"hello notes\n")
    (root / "big.bin").write_bytes(os.urandom(BIG))
    (root / "a <b> & c.txt").write_bytes(b"escaped\n")
    (root / "docs").mkdir()
    (root / "uploads").mkdir()
    return root


@pytest.fixture(scope="module")
def daemon(tree: Path) -> Iterator[Daemon]:
    with running(
        "sockd-file",
        f"""
        [sockd]
        abort_grace = 0.5
        [file]
        listen = tcp:0:interface=127.0.0.1
        listen_http = tcp:0:interface=127.0.0.2
        root = {tree}
        writable = true
        upload_allow = 127.0.0.0/8
        idle_timeout = 10
        """,
    ) as d:
        yield d


def url(daemon: Daemon, path: str, http_port: bool = False) -> str:
    """The shared port (127.0.0.1), or the HTTP-only one (127.0.0.2)."""
    host = "127.0.0.2" if http_port else "127.0.0.1"
    (port,) = [p for h, p in daemon.ports[("file", "TCP")] if h == host]
    return f"http://{host}:{port}{path}"


def test_curl_get_range_head(daemon: Daemon, tree: Path) -> None:
    curl = need("curl")
    big = (tree / "big.bin").read_bytes()
    result = run_tool([curl, "-sf", url(daemon, "/big.bin")], timeout=20)
    assert result.stdout == big
    result = run_tool([curl, "-sf", "-r", "0-99", url(daemon, "/big.bin")])
    assert result.stdout == big[:100]
    head = run_tool([curl, "-sfI", url(daemon, "/notes.txt")]).stdout.decode()
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert "Content-Length: 12\r\n" in head
    assert re.search(r'ETag: "[0-9a-f]+-c-[0-9a-f]+"\r\n', head)
    assert "Accept-Ranges: bytes\r\n" in head
    missing = run_tool(
        [curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", url(daemon, "/nope")]
    )
    assert missing.stdout == b"404"


def test_curl_resume_and_conditional(
    daemon: Daemon, tree: Path, tmp_path: Path
) -> None:
    curl = need("curl")
    big = (tree / "big.bin").read_bytes()
    partial = tmp_path / "big.bin"
    partial.write_bytes(big[:1000000])
    result = run_tool(
        [curl, "-sf", "-C", "-", "-o", str(partial), url(daemon, "/big.bin")],
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert partial.read_bytes() == big
    # -z: If-Modified-Since the file's own date: nothing sent again.
    when = email.utils.formatdate((tree / "notes.txt").stat().st_mtime + 1, usegmt=True)
    result = run_tool(
        [curl, "-s", "-z", when, "-w", "%{http_code}", url(daemon, "/notes.txt")]
    )
    assert result.stdout == b"304"
    result = run_tool(
        [curl, "-s", "-z", "1 Jan 2000 00:00:00 GMT", url(daemon, "/notes.txt")]
    )
    assert result.stdout == b"hello notes\n"


def test_curl_upload(daemon: Daemon, tree: Path, tmp_path: Path) -> None:
    curl = need("curl")
    source = tmp_path / "up.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024))  # curl sends Expect: 100-continue
    result = run_tool(
        [
            curl,
            "-s",
            "-w",
            "\n%{http_code}",
            "-T",
            str(source),
            url(daemon, "/uploads/up.bin"),
        ],
        timeout=20,
    )
    assert result.stdout.endswith(b"\n201"), result.stdout
    assert (tree / "uploads" / "up.bin").read_bytes() == source.read_bytes()
    again = run_tool(
        [
            curl,
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-T",
            str(source),
            url(daemon, "/uploads/up.bin"),
        ],
        timeout=20,
    )
    assert again.stdout == b"409"  # overwrite is off
    assert not [p for p in (tree / "uploads").iterdir() if p.name.startswith(".")]


def test_wget_resume(daemon: Daemon, tree: Path, tmp_path: Path) -> None:
    wget = need("wget")
    big = (tree / "big.bin").read_bytes()
    (tmp_path / "big.bin").write_bytes(big[:12345])
    result = run_tool(
        [
            wget,
            "-q",
            "-c",
            "-P",
            str(tmp_path),
            url(daemon, "/big.bin", http_port=True),
        ],
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "big.bin").read_bytes() == big


def test_chromium_index(daemon: Daemon, tmp_path: Path) -> None:
    chromium = need("chromium")
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    index = url(daemon, "/", http_port=True)
    dom = run_tool([*flags, "--dump-dom", index], timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout.decode()
    assert '<a href="a%20%3Cb%3E%20%26%20c.txt">a &lt;b&gt; &amp; c.txt</a>' in page
    assert '<a href="docs/">docs/</a>' in page
    shot = tmp_path / "index.png"
    result = run_tool(
        [*flags, f"--screenshot={shot}", "--window-size=800,600", index], timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(set(pixels(png))) > 8  # text drawn, not one colour


def pixels(png: bytes) -> bytes:
    """The decompressed image data of a PNG (filtered rows, enough to compare)."""
    data, at = b"", 8
    while at < len(png):
        length = int.from_bytes(png[at : at + 4], "big")
        kind = png[at + 4 : at + 8]
        if kind == b"IDAT":
            data += png[at + 8 : at + 8 + length]
        at += 12 + length
    return zlib.decompress(data)
