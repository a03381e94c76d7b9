"""
Tests for sockd.client.urls: the strict URL parser behind C{sockd get|ls|
stat|put URL}, and how the commands take (or refuse) each kind of address.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sockd.client.fileproto import EXIT_USAGE
from sockd.client.urls import Location, framed, is_url, parse_url
from tests.client.test_files import FILES, serve_fixture, sockd  # noqa: F401

GOOD = [
    (
        "sockd://files.example/docs/a.txt",
        ("sockd", "files.example", 8898, "/docs/a.txt", ""),
    ),
    ("sockd://h:9000/x", ("sockd", "h", 9000, "/x", "")),
    ("SOCKD://H.Example/x", ("sockd", "h.example", 8898, "/x", "")),
    ("sockd://h", ("sockd", "h", 8898, "", "")),
    (
        "sockd://[::1]:8898/with%20space%25.txt",
        ("sockd", "::1", 8898, "/with space%.txt", ""),
    ),
    ("sockd://h/caf%C3%A9", ("sockd", "h", 8898, "/caf\u00e9", "")),
    # Undecodable bytes stay bytes (surrogate escapes), as on a command line.
    ("sockd://h/%FF", ("sockd", "h", 8898, "/\udcff", "")),
    ("sockd://127.0.0.1:1/", ("sockd", "127.0.0.1", 1, "/", "")),
    ("gopher://h/0/hello.txt", ("gopher", "h", 70, "/hello.txt", "0")),
    ("gopher://h:8898/9/docs/x%20y.bin", ("gopher", "h", 8898, "/docs/x y.bin", "9")),
    ("gopher://h/", ("gopher", "h", 70, "", "1")),
    ("gopher://h", ("gopher", "h", 70, "", "1")),
    ("gopher://h/1", ("gopher", "h", 70, "", "1")),
    ("gopher://h/7/find%09word", ("gopher", "h", 70, "/find\tword", "7")),
    ("http://h/a/b.iso", ("http", "h", 80, "/a/b.iso", "")),
    ("http://h", ("http", "h", 80, "/", "")),
    ("http://h:8080/a%20b?x=1&y=%2F", ("http", "h", 8080, "/a%20b?x=1&y=%2F", "")),
    ("https://[2001:db8::1]/f", ("https", "2001:db8::1", 443, "/f", "")),
    ("HTTPS://h:65535/f", ("https", "h", 65535, "/f", "")),
]


@pytest.mark.parametrize(("url", "expected"), GOOD)
def test_parse_url_accepts(url: str, expected: tuple[Any, ...]) -> None:
    location = parse_url(url)
    assert (
        location.scheme,
        location.host,
        location.port,
        location.path,
        location.item,
    ) == expected


BAD = [
    ("ftp://h/x", "unsupported scheme 'ftp'"),
    ("file:///etc/passwd", "unsupported scheme 'file'"),
    ("sockd:/h/x", "unsupported scheme"),
    ("sockd:///x", "no host"),
    ("http://", "no host"),
    ("http://user@h/x", "user names and passwords"),
    ("http://user:pw@h/x", "user names and passwords"),
    ("http://h/x#frag", "fragments"),
    ("http://h/x#", "fragments"),
    ("http://h:0/x", "port must be a number from 1 to 65535"),
    ("http://h:65536/x", "port must be"),
    ("http://h:+80/x", "port must be"),
    ("http://h:/x", "port must be"),
    ("http://h:8o/x", "port must be"),
    ("http://[::1/x", "Invalid IPv6 URL"),
    ("http://[nope]/x", "IPv6"),
    ("http://[1.2.3.4]/x", "IPv4 address cannot be in brackets"),
    ("http://::1/x", "brackets"),
    ("http://[::1]x/", "port must be"),
    ("http://h%41/x", "bad host"),
    ("http://-h/x", "bad host"),
    ("http://h/a b", "spaces, control and non-ASCII"),
    ("http://h/a\tb", "spaces, control and non-ASCII"),
    ("http://h/a\r\nHost: evil", "spaces, control and non-ASCII"),
    ("http://h/caf\u00e9", "spaces, control and non-ASCII"),
    ("sockd://h/100%", "two hex digits"),
    ("http://h/%zz", "two hex digits"),
    ("sockd://h/x?y", "a query"),
    ("gopher://h/0/x?y", "a query"),
    ("gopher://h/0/a%0D%0Ab", "CR, LF and NUL"),
    ("gopher://h/0/a%00", "CR, LF and NUL"),
]


@pytest.mark.parametrize(("url", "message"), BAD)
def test_parse_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_url(url)


def test_is_url_only_with_a_scheme() -> None:
    assert is_url("http://h/x")
    assert not is_url("host:8898")
    assert not is_url("[::1]:8898")


def test_location_name_and_server() -> None:
    assert parse_url("http://h/a/b%20c.iso?x=1").name == "b c.iso"
    assert parse_url("http://h/a/").name == "a"
    assert parse_url("http://h/").name == ""
    # A decoded slash is not a path separator: no usable local name.
    assert "/" in parse_url("http://h/a%2Fb").name
    assert parse_url("gopher://h/0/docs/x.txt").name == "x.txt"
    assert parse_url("sockd://[::1]:9/d/f").server == "[::1]:9"
    assert framed("h", "d/f") == Location("sockd", "h", 8898, "d/f")


def test_url_round_trips_for_messages() -> None:
    for url in (
        "sockd://h:8898/with%20space",
        "gopher://h:70/0/x%09y",
        "http://h:80/a?b",
        "https://[::1]:443/f",
    ):
        assert parse_url(parse_url(url).url()) == parse_url(url)


# The commands ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["get", "ftp://h/x"],
        ["get", "http://u@h/x"],
        ["get", "http://h/x#y"],
        ["get", "sockd://h:99999/x"],
        ["get", "sockd://h/x", "y"],
        ["get", "http://h/x", "y"],
        ["get", "http://h/"],
        ["get", "http://h/a%2Fb"],
        ["get", "http://h/x%00"],
        ["get", "--tls", "http://h/x"],
        ["get", "--tls", "gopher://h/0/x"],
        ["get", "-c", "gopher://h/0/x"],
        ["get", "--cafile", "/etc/hosts", "gopher://h/0/x"],
        ["get", "-r", "gopher://h/1/d"],
        ["get", "-r", "http://h/d/"],
        ["get", "-r", "sockd://h/d", "-o", "-"],
        ["get", "-r", "sockd://h/"],
        ["get", "--cacert", "/nonexistent/ca.pem", "https://h/x"],
        ["ls", "http://h/"],
        ["ls", "gopher://h/"],
        ["ls", "sockd://h/d", "e"],
        ["stat", "https://h/x"],
        ["stat", "h"],
        ["put", "http://h/x", "local"],
        ["put", "sockd://h/x", "local", "y"],
    ],
)
def test_usage_errors(tmp_path: Path, capfd: Any, argv: list[str]) -> None:
    status, _, err = sockd(capfd, *argv)
    assert status == EXIT_USAGE, err
    assert err.startswith(f"sockd {argv[0]}: ")
    assert list(tmp_path.iterdir()) == []


def test_framed_commands_name_the_allowed_forms(capfd: Any) -> None:
    status, _, err = sockd(capfd, "ls", "http://h/")
    assert status == EXIT_USAGE
    assert "speaks only the framed protocol" in err and "sockd://" in err


def test_get_ls_stat_put_take_sockd_urls(
    serve: Any, tmp_path: Path, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(FILES)
    server.writable = True
    port = server.server_address[1]
    monkeypatch.chdir(tmp_path)
    status, _, err = sockd(capfd, "get", f"sockd://127.0.0.1:{port}/docs/README.txt")
    assert status == 0, err
    assert (tmp_path / "README.txt").read_bytes() == b"read me\n"
    status, out, _ = sockd(capfd, "ls", f"sockd://127.0.0.1:{port}/docs")
    assert (status, out) == (0, "README.txt\ndeep/\n")
    status, out, _ = sockd(
        capfd, "stat", f"sockd://127.0.0.1:{port}/with%20space%20%25.txt"
    )
    assert status == 0 and "size:   9\n" in out
    (tmp_path / "up.bin").write_bytes(b"up")
    status, _, err = sockd(capfd, "put", f"sockd://127.0.0.1:{port}/docs/", "up.bin")
    assert status == 0, err
    assert server.files[b"docs/up.bin"] == b"up"
    assert server.requests == [
        b"GET /docs/README.txt\r\n",
        b"SUM /docs/README.txt\r\n",
        b"LIST /docs\r\n",
        b"STAT /with%20space%20%25.txt\r\n",
        b"PUT /docs/up.bin 2\r\n",
    ]


def test_url_root_with_an_argument(serve: Any, capfd: Any) -> None:
    server = serve(FILES)
    port = server.server_address[1]
    status, out, _ = sockd(capfd, "ls", f"sockd://127.0.0.1:{port}/", "docs")
    assert (status, out) == (0, "README.txt\ndeep/\n")
    status, out, _ = sockd(capfd, "stat", f"sockd://127.0.0.1:{port}")
    assert status == 0 and "type:   dir\n" in out
