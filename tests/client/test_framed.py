"""
Tests for C{sockd get -r} (sockd.client.framed.Tree) against the threaded
fake sockd-file server of test_client_files, including hostile listings:
whatever names the server sends, nothing is written outside the target.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from sockd.client import framed
from sockd.client.fileproto import EXIT_ERROR, EXIT_SERVER, ClientError
from tests.client.test_files import BLOB, serve_fixture, sockd  # noqa: F401

TREE = {
    b"top.txt": b"top\n",
    b"blob.bin": BLOB,
    b"docs/README.txt": b"read me\n",
    b"docs/deep/x": b"x",
    b"docs/deep/er/y": b"y",
    b"empty": b"",
}


def contents(root: Path) -> dict[str, bytes]:
    """Every regular file beneath C{root}, by relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """A work directory with canaries beside and above where the tree goes."""
    (tmp_path / "canary").write_bytes(b"canary")
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def test_tree_with_subdirectories(serve: Any, place: Path, capfd: Any) -> None:
    server = serve(TREE)
    url = f"sockd://127.0.0.1:{server.server_address[1]}/"
    status, out, err = sockd(capfd, "get", "-r", url, "-o", str(place / "t"))
    assert (status, out, err) == (0, "", "")
    assert contents(place / "t") == {
        "blob.bin": BLOB,
        "docs/README.txt": b"read me\n",
        "docs/deep/er/y": b"y",
        "docs/deep/x": b"x",
        "empty": b"",
        "top.txt": b"top\n",
    }
    # One connection, directory by directory: files first, then subdirectories.
    assert [r.split(b" ")[0] for r in server.requests].count(b"LIST") == 4
    assert server.requests[:3] == [
        b"LIST /\r\n",
        b"GET blob.bin\r\n",
        b"SUM blob.bin\r\n",
    ]
    assert not list(place.rglob("*.part"))


def test_tree_default_target_is_the_remote_name(
    serve: Any, place: Path, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(TREE)
    monkeypatch.chdir(place)
    status, _, err = sockd(capfd, "get", "-r", server.address, "docs/deep")
    assert status == 0, err
    assert contents(place) == {"deep/er/y": b"y", "deep/x": b"x"}


@pytest.mark.parametrize(
    "name",
    [
        b"../x",
        b"a/../../x",
        b"..",
        b".",
        b"/abs",
        b"/etc/passwd",
        b"a/b",
        b"",
        b"nul\x00byte",
        b"back\\slash",
        b"..\\..\\x",
        b"\xef\xbc\x8e\xef\xbc\x8e",  # fullwidth dots: folds to ".."
        b"bad\xffutf8",
        b"ctl\x1b[2Jx",
        b"n" * 256,
    ],
)
def test_tree_refuses_unsafe_names(
    serve: Any, place: Path, capfd: Any, name: bytes
) -> None:
    server = serve({b"ok": b"fine"})
    for kind in ("f", "d"):
        server.listings[b""] = [(kind, 4, name), ("f", 4, b"ok")]
        server.requests.clear()
        status, _, err = sockd(
            capfd, "get", "-r", f"{server.address}", "/", "-o", str(place / "t")
        )
        assert status == EXIT_ERROR, err
        assert "name refused" in err
        assert "1 of 2 entries not fetched" in err
        assert "\x1b" not in err and "\x00" not in err
        # Only the good name was asked for, and only it was written.
        assert server.requests == [b"LIST /\r\n", b"GET ok\r\n", b"SUM ok\r\n"]
        assert contents(place.parent) == {"canary": b"canary", "work/t/ok": b"fine"}
        (place / "t" / "ok").unlink()


def test_tree_refuses_duplicates_and_part_names(
    serve: Any, place: Path, capfd: Any
) -> None:
    server = serve({b"a": b"A", b"b": b"B", b"b.part": b"not a part"})
    server.listings[b""] = [
        ("f", 1, b"a"),
        ("f", 1, b"a"),
        ("d", 0, b"a"),
        ("f", 1, b"b"),
        ("f", 10, b"b.part"),
    ]
    status, _, err = sockd(capfd, "get", "-r", server.address, "/", "-o", str(place))
    assert status == EXIT_ERROR
    assert err.count("listed twice by the server") == 2
    assert "b.part: the download of b uses this name" in err
    assert "3 of 5 entries not fetched" in err
    assert contents(place) == {"a": b"A", "b": b"B"}
    assert server.requests.count(b"GET a\r\n") == 1
    assert b"GET b.part\r\n" not in server.requests


def test_tree_never_follows_local_symlinks(serve: Any, place: Path, capfd: Any) -> None:
    server = serve({b"f": b"new", b"g": b"ggg", b"sub/inner": b"in"})
    outside = place.parent / "outside"
    outside.mkdir()
    target = place / "t"
    target.mkdir()
    (target / "f").symlink_to(place.parent / "canary")
    (target / "sub").symlink_to(outside)
    (target / "g.part").symlink_to(place.parent / "canary")
    args = ["get", "-r", "-c", server.address, "/", "-o", str(target)]
    status, _, err = sockd(capfd, *args)
    assert status == EXIT_ERROR
    assert "f exists and differs: use --force" in err
    assert "g.part: cannot resume" in err
    assert "partial data kept" not in err
    assert "sub exists here and is not a directory" in err
    assert "3 of 3 entries not fetched" in err
    assert (place.parent / "canary").read_bytes() == b"canary"
    assert list(outside.iterdir()) == []

    # --force replaces the symlink f itself; the others stay refused.
    status, _, err = sockd(capfd, *args, "--force")
    assert status == EXIT_ERROR
    assert not (target / "f").is_symlink()
    assert (target / "f").read_bytes() == b"new"
    assert (place.parent / "canary").read_bytes() == b"canary"
    assert list(outside.iterdir()) == []
    assert (target / "g.part").is_symlink() and (target / "sub").is_symlink()


def test_tree_skips_identical_files_by_checksum(
    serve: Any, place: Path, capfd: Any
) -> None:
    server = serve({b"same": b"same data", b"other": b"remote!", b"new": b"n"})
    (place / "same").write_bytes(b"same data")
    (place / "other").write_bytes(b"local!!")  # same size, other bytes
    status, _, err = sockd(capfd, "get", "-r", server.address, "/", "-o", str(place))
    assert status == EXIT_ERROR
    assert "other exists and differs: use --force" in err
    assert "1 of 3 entries not fetched" in err
    assert b"GET same\r\n" not in server.requests
    assert b"SUM same\r\n" in server.requests
    assert contents(place) == {"new": b"n", "other": b"local!!", "same": b"same data"}

    server.requests.clear()
    status, _, err = sockd(
        capfd, "get", "-r", "-f", server.address, "/", "-o", str(place)
    )
    assert (status, err) == (0, "")
    # The identical files are checked, not fetched again.
    assert sorted(r for r in server.requests if r.startswith(b"GET")) == [
        b"GET other\r\n"
    ]
    assert contents(place) == {"new": b"n", "other": b"remote!", "same": b"same data"}


def test_tree_resumes_a_part(serve: Any, place: Path, capfd: Any) -> None:
    server = serve({b"d/blob.bin": BLOB})
    (place / "d").mkdir()
    (place / "d" / "blob.bin.part").write_bytes(BLOB[:1_000_000])
    status, _, err = sockd(capfd, "get", "-r", server.address, "/", "-o", str(place))
    assert status == EXIT_ERROR
    assert "blob.bin.part exists: resume it with --continue" in err
    status, _, err = sockd(
        capfd, "get", "-r", "-c", server.address, "/", "-o", str(place)
    )
    assert (status, err) == (0, "")
    assert b"GET d/blob.bin 1000000\r\n" in server.requests
    assert contents(place) == {"d/blob.bin": BLOB}


def test_tree_server_errors_per_file(serve: Any, place: Path, capfd: Any) -> None:
    server = serve({b"a": b"A"})
    server.listings[b""] = [("f", 1, b"gone"), ("f", 1, b"a"), ("d", 0, b"nodir")]
    status, _, err = sockd(capfd, "get", "-r", server.address, "/", "-o", str(place))
    # The first failure (404) gives the status; the rest was fetched.
    assert status == 4
    assert "gone: server error 404" in err
    assert "nodir: server error 404" in err
    assert contents(place) == {"a": b"A"}


def test_tree_of_a_missing_directory(serve: Any, place: Path, capfd: Any) -> None:
    server = serve({b"a": b"A"})
    status, _, err = sockd(capfd, "get", "-r", server.address, "nope", "-o", str(place))
    assert status == 4
    assert err == "sockd get: server error 404: not found\n"
    assert list(place.iterdir()) == []
    # A target made for the tree is removed again if nothing came of it.
    status, _, _ = sockd(
        capfd, "get", "-r", server.address, "nope", "-o", str(place / "new")
    )
    assert status == 4
    assert list(place.iterdir()) == []


def test_tree_counts_what_it_did(serve: Any, place: Path, capfd: Any) -> None:
    server = serve({b"a/b": b"B", b"c": b"C"})
    server.listings[b""] = [("d", 0, b"a"), ("f", 1, b"c"), ("f", 1, b"..")]
    status, _, err = sockd(capfd, "get", "-r", server.address, "/", "-o", str(place))
    assert status == EXIT_ERROR
    # a/, a/b and c were fetched; ".." was not.
    assert "1 of 4 entries not fetched" in err
    assert contents(place) == {"a/b": b"B", "c": b"C"}


def test_tree_checksum_mismatch(serve: Any, place: Path, capfd: Any) -> None:
    server = serve({b"a": b"A"})
    server.sum_override = "0" * 64
    status, _, err = sockd(capfd, "get", "-r", server.address, "/", "-o", str(place))
    assert status == 6
    assert "SHA-256 mismatch" in err and "data kept in" in err
    assert contents(place) == {"a.part": b"A"}


def test_tree_bad_listing_ends_the_run(serve: Any, place: Path, capfd: Any) -> None:
    server = serve({b"a": b"A"})
    server.listings[b""] = [("x", 1, b"a")]
    status, _, err = sockd(capfd, "get", "-r", server.address, "/", "-o", str(place))
    assert status == EXIT_SERVER
    assert "bad LIST line" in err and f"while listing {place}" in err


def test_tree_depth_is_bounded(
    serve: Any, place: Path, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(framed, "MAX_DEPTH", 2)
    server = serve({b"a/b/c/d": b"deep", b"a/b/f": b"f"})
    status, _, err = sockd(capfd, "get", "-r", server.address, "/", "-o", str(place))
    assert status == EXIT_ERROR
    assert "a/b/c: deeper than 2 levels: skipped" in err
    assert contents(place) == {"a/b/f": b"f"}


def test_tree_into_a_file_is_refused(serve: Any, place: Path, capfd: Any) -> None:
    server = serve(TREE)
    (place / "t").write_bytes(b"mine")
    status, _, err = sockd(
        capfd, "get", "-r", server.address, "/", "-o", str(place / "t")
    )
    assert status == EXIT_ERROR
    assert "cannot open directory" in err
    assert server.requests == []


def test_checked_name() -> None:
    assert framed._checked_name(b"caf\xc3\xa9 .txt") == "caf\u00e9 .txt"
    assert framed._checked_name(b".hidden") == ".hidden"
    for bad in (b"..", b"a/b", b"/a", b"a/", b"\x00", b"\\", b"x" * 256):
        with pytest.raises(ClientError, match="name refused"):
            framed._checked_name(bad)


def test_identical_check_reads_no_symlink(tmp_path: Path) -> None:
    class Client:
        def sum(self, path: str) -> tuple[str, int, int]:
            return hashlib.sha256(b"canary").hexdigest(), 6, 0

    (tmp_path / "canary").write_bytes(b"canary")
    (tmp_path / "link").symlink_to(tmp_path / "canary")
    tree = framed.Tree(Client(), None, print)  # type: ignore[arg-type]
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert tree._identical(fd, "canary", "canary", "canary")
        with pytest.raises(ClientError, match="cannot read"):
            tree._identical(fd, "link", "link", "link")
    finally:
        os.close(fd)
