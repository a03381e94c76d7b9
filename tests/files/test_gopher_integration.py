"""
Integration tests: Gopher clients (lynx, curl) against a real C{twistd -n
sockd-file} on 127.0.0.1, one daemon for every check: a menu shaped by a
gophermap, a file, an error item, and the advertised address before and
after a reload that sets C{gopher_host} and C{gopher_port}.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Daemon, need, run_tool, running

pytestmark = pytest.mark.integration

CONFIG = """
[echo]
enabled = false
[file]
listen = tcp:0:interface=127.0.0.1
root = {root}
gophermap = true
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gopher")
    (root / "notes.txt").write_bytes(b"hello notes\n" * 100)
    (root / "page.html").write_bytes(b"<p>hi</p>\n")
    (root / "sub").mkdir()
    (root / "sub" / "a.txt").write_bytes(b"a\n")
    (root / ".secret").write_bytes(b"never\n")
    (root / "gophermap").write_bytes(
        b"Welcome to the test archive.\n0The notes\tnotes.txt\n0Secret\t.secret\n*\n"
    )
    return root


@pytest.fixture(scope="module")
def daemon(tree: Path) -> Iterator[Daemon]:
    with running("sockd-file", CONFIG.format(root=tree)) as d:
        yield d


def curl(*args: str) -> tuple[int, bytes]:
    result = run_tool([need("curl"), "-sS", "--max-time", "10", *args], timeout=20)
    return result.returncode, result.stdout


def test_lynx_shows_the_menu(daemon: Daemon) -> None:
    lynx = need("lynx")
    port = daemon.port("file")
    result = run_tool(
        [lynx, "-dump", "-nocolor", f"gopher://127.0.0.1:{port}/1/"],
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "Welcome to the test archive." in text
    shown = re.findall(r"\[\d+\](\S[^\n]*)", text)
    assert shown[:3] == ["The notes", "page.html", "sub"]
    links = re.findall(r"^\s*\d+\. (\S+)$", text, re.MULTILINE)
    base = f"gopher://127.0.0.1:{port}"
    # lynx writes an h item's link with the selector's / dropped; the
    # server takes a selector with or without it.
    assert links == [f"{base}/0/notes.txt", f"{base}/hpage.html", f"{base}/1/sub"]
    assert "Secret" not in text and "gophermap" not in text
    page = run_tool([lynx, "-dump", "-nocolor", links[1]], timeout=20)
    assert page.stdout.decode().strip() == "hi"


def test_curl_file_and_error(daemon: Daemon, tree: Path) -> None:
    base = f"gopher://127.0.0.1:{daemon.port('file')}"
    assert curl(f"{base}/0/notes.txt") == (0, (tree / "notes.txt").read_bytes())
    # curl shows the error item, and exits 0: Gopher has no status to fail on.
    assert curl(f"{base}/0/nope.txt") == (
        0,
        b"3404 not found\t\terror.host\t1\r\n.\r\n",
    )
    assert curl(f"{base}/0/.secret") == (
        0,
        b"3403 hidden files are not served\t\terror.host\t1\r\n.\r\n",
    )


def test_advertised_address_and_reload(daemon: Daemon, tree: Path) -> None:
    """Last: it leaves the daemon advertising another address."""
    port = daemon.port("file")
    base = f"gopher://127.0.0.1:{port}"
    local = f"0a.txt\t/sub/a.txt\t127.0.0.1\t{port}\r\n.\r\n".encode()
    assert curl(f"{base}/1/sub") == (0, local)
    daemon.config_path.write_text(
        CONFIG.format(root=tree) + "gopher_host = gopher.example.org\n"
        "gopher_port = 70\n"
    )
    assert daemon.process is not None
    os.kill(daemon.process.pid, signal.SIGHUP)
    daemon.wait_for(r"configuration reloaded", 10)
    assert curl(f"{base}/1/sub") == (
        0,
        b"0a.txt\t/sub/a.txt\tgopher.example.org\t70\r\n.\r\n",
    )
    result = run_tool([need("lynx"), "-dump", f"{base}/1/sub"], timeout=20)
    assert "gopher://gopher.example.org/0/sub/a.txt" in result.stdout.decode()
