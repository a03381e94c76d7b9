"""
Tests for L{sockd.files.paths}: the hostile path table, symlinks, special files
and swap races, each against both resolvers (openat2 and the walk).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockd.files.paths import (
    RESERVED_PREFIX,
    PathError,
    Root,
    openat2_available,
    parse_path,
)

CANARY = b"CANARY-never-served"
#: an upload in progress, as sockd names it
TEMP = RESERVED_PREFIX + "0123456789abcdef"

RESOLVERS = [
    pytest.param(
        True,
        id="openat2",
        marks=pytest.mark.skipif(
            not openat2_available(), reason="openat2 is not available here"
        ),
    ),
    pytest.param(False, id="walk"),
]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """
    base/canary, base/files (the root), base/files-secret/x: the sibling
    with a prefix of the root's name.  Canaries sit beside and above.
    """
    base = tmp_path
    (base / "canary").write_bytes(CANARY)
    (base / "files-secret").mkdir()
    (base / "files-secret" / "x").write_bytes(CANARY)
    root = base / "files"
    root.mkdir()
    (root / "notes.txt").write_bytes(b"notes\n")
    (root / ".hidden").write_bytes(b"hidden\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_bytes(b"inner\n")
    (root / "a").mkdir()
    (root / "....").mkdir()
    (root / "...." / "canary").write_bytes(CANARY)
    os.symlink("../canary", root / "out_file")
    os.symlink("../files-secret", root / "out_dir")
    os.symlink(str(base / "canary"), root / "abs")
    os.symlink(str(root / "notes.txt"), root / "abs_inside")
    os.symlink("/dev/zero", root / "zero")
    os.symlink("/proc/self/environ", root / "environ")
    os.symlink("loop", root / "loop")
    os.symlink("notes.txt", root / "in_link")
    os.symlink("../notes.txt", root / "sub" / "up")
    os.symlink("../../canary", root / "sub" / "up2")
    os.symlink("sub", root / "sub_link")
    # Hidden and reserved names reached through links inside the root.
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"[core]\n")
    (root / TEMP).write_bytes(b"partial upload")
    os.symlink(".hidden", root / "vis.txt")
    os.symlink(".git", root / "gitlink")
    os.symlink("../.git/config", root / "sub" / "config")
    os.symlink(TEMP, root / "uplink")
    os.symlink("sub/../.hidden", root / "dotdot_hidden")
    os.symlink("notes.txt", root / ".hidden_link")
    os.symlink(".hidden_link", root / "via_hidden_link")
    os.mkfifo(root / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock"))
    yield root
    listener.close()


def read_all(root: Root, raw: bytes) -> bytes:
    opened = root.open(root.parse(raw), "file")
    try:
        return os.pread(opened.fd, 1 << 20, 0)
    finally:
        opened.close()


HOSTILE = [
    (b"../canary", 403),
    (b"a/../../canary", 403),
    (b"a/../notes.txt", 403),
    (b"..\\..\\canary", 400),
    ("\uff0e\uff0e/canary".encode(), 403),  # fullwidth dots
    ("\uff0e\uff0e\uff0fcanary".encode(), 403),  # and fullwidth slash
    (b"....//canary", 403),
    (b".", 403),
    (b"./notes.txt", 403),
    (b"", 405),  # the root itself: a directory
    (b"/", 405),
    (b"sub", 405),
    (b"notes.txt\x00", 400),
    (b"\x00", 400),
    (b"x" * 256, 414),
    (b"a/" * 2048 + b"x", 414),  # 4097 bytes
    (b"\xff\xfe", 400),
    (b"caf\xc3", 400),
    (b"notes\x1b[2J.txt", 400),
    (b"notes\r\n.txt", 400),
    (b"../files-secret/x", 403),
    (b"/../canary", 403),
    (b"//etc/passwd", 404),
    (b"/etc/passwd", 404),
    (b"out_file", 403),
    (b"out_dir/x", 403),
    (b"abs", 403),
    (b"zero", 403),
    (b"environ", 403),
    (b"sub/up2", 403),
    (b"loop", 403),
    (b"fifo", 405),
    (b"sock", 405),
    (b".hidden", 403),
    (b"sub/.hidden", 403),
    (b"vis.txt", 403),
    (b"gitlink/config", 403),
    (b"gitlink", 403),
    (b"sub/config", 403),
    (b"dotdot_hidden", 403),
    (b"via_hidden_link", 403),
    (TEMP.encode(), 403),  # hidden, first
    (b"uplink", 404),
    (b"missing", 404),
    (b"notes.txt/x", 404),
]


@pytest.mark.parametrize("use_openat2", RESOLVERS)
@pytest.mark.parametrize(("raw", "code"), HOSTILE)
def test_hostile(tree: Path, use_openat2: bool, raw: bytes, code: int) -> None:
    root = Root(tree, use_openat2=use_openat2)
    try:
        with pytest.raises(PathError) as caught:
            read_all(root, raw)
        assert caught.value.code == code, caught.value.reason
        assert caught.value.reason
    finally:
        root.close()


def test_limits_are_exact() -> None:
    """4096 bytes of path and 255 of one name are allowed; one more is not."""
    assert parse_path(b"a/" * 2047 + b"xy") == ("a",) * 2047 + ("xy",)
    assert parse_path(b"x" * 255) == ("x" * 255,)
    with pytest.raises(PathError):
        parse_path(b"x" * 256)
    with pytest.raises(PathError):
        parse_path(b"a/" * 2048 + b"x")


def test_names() -> None:
    assert parse_path(b"/a//b/") == ("a", "b")
    assert parse_path("caf\u00e9 menu.txt".encode()) == ("caf\u00e9 menu.txt",)
    assert parse_path(b".cfg", hidden=True) == (".cfg",)
    assert parse_path(b"a..b") == ("a..b",)  # dots inside a name are fine


@pytest.mark.parametrize("use_openat2", RESOLVERS)
@pytest.mark.parametrize(
    ("raw", "content"),
    [
        (b"notes.txt", b"notes\n"),
        (b"/notes.txt", b"notes\n"),
        (b"in_link", b"notes\n"),
        (b"sub/up", b"notes\n"),
        (b"sub_link/inner.txt", b"inner\n"),
        (b"sub/inner.txt", b"inner\n"),
    ],
)
def test_served(tree: Path, use_openat2: bool, raw: bytes, content: bytes) -> None:
    root = Root(tree, use_openat2=use_openat2)
    try:
        assert read_all(root, raw) == content
    finally:
        root.close()


@pytest.mark.parametrize("use_openat2", RESOLVERS)
def test_absolute_symlink_inside_is_refused(tree: Path, use_openat2: bool) -> None:
    """Absolute targets are never followed, even when they point inside."""
    root = Root(tree, use_openat2=use_openat2)
    with pytest.raises(PathError) as caught:
        read_all(root, b"abs_inside")
    assert caught.value.code == 403
    root.close()


@pytest.mark.parametrize("use_openat2", RESOLVERS)
@pytest.mark.parametrize("raw", [b"in_link", b"sub/up", b"sub_link/inner.txt"])
def test_symlinks_refused(tree: Path, use_openat2: bool, raw: bytes) -> None:
    root = Root(tree, symlinks="refuse", use_openat2=use_openat2)
    with pytest.raises(PathError) as caught:
        read_all(root, raw)
    assert caught.value.code == 403
    assert read_all(root, b"notes.txt") == b"notes\n"
    root.close()


@pytest.mark.parametrize("use_openat2", RESOLVERS)
def test_hidden_allowed(tree: Path, use_openat2: bool) -> None:
    root = Root(tree, hidden=True, use_openat2=use_openat2)
    assert read_all(root, b".hidden") == b"hidden\n"
    root.close()


@pytest.mark.parametrize("use_openat2", RESOLVERS)
def test_hidden_through_links_when_served(tree: Path, use_openat2: bool) -> None:
    """With hidden names served, links to them are too; reserved ones never."""
    root = Root(tree, hidden=True, use_openat2=use_openat2)
    try:
        assert read_all(root, b"vis.txt") == b"hidden\n"
        assert read_all(root, b"gitlink/config") == b"[core]\n"
        assert read_all(root, b"via_hidden_link") == b"notes\n"
        for raw in (b"uplink", TEMP.encode()):
            with pytest.raises(PathError) as caught:
                read_all(root, raw)
            assert caught.value.code == 404
    finally:
        root.close()


@pytest.mark.parametrize("use_openat2", RESOLVERS)
def test_hidden_link_target_directory(tree: Path, use_openat2: bool) -> None:
    """A directory reached through a link to a hidden one is not opened."""
    root = Root(tree, use_openat2=use_openat2)
    try:
        with pytest.raises(PathError) as caught:
            root.open(("gitlink",), "dir")
        assert caught.value.code == 403
        assert root.open(("sub_link",), "dir").is_dir  # a plain link still works
    finally:
        root.close()


@pytest.mark.parametrize("use_openat2", RESOLVERS)
def test_hardlinks(tree: Path, use_openat2: bool) -> None:
    """refuse: a regular file with a second name is refused, by either name."""
    os.link(tree / "sub" / "inner.txt", tree / "twin.txt")
    allow = Root(tree, use_openat2=use_openat2)
    refuse = Root(tree, hardlinks="refuse", use_openat2=use_openat2)
    try:
        assert read_all(allow, b"twin.txt") == b"inner\n"
        for raw in (b"twin.txt", b"sub/inner.txt", b"sub_link/inner.txt"):
            with pytest.raises(PathError) as caught:
                read_all(refuse, raw)
            assert caught.value.code == 403, raw
        assert read_all(refuse, b"notes.txt") == b"notes\n"  # one link
        assert refuse.open(("sub",), "dir").is_dir  # directories have several
        os.unlink(tree / "twin.txt")
        assert read_all(refuse, b"sub/inner.txt") == b"inner\n"
    finally:
        allow.close()
        refuse.close()
    with pytest.raises(ValueError, match="hardlinks"):
        Root(tree, hardlinks="sometimes")


@pytest.mark.parametrize("use_openat2", RESOLVERS)
def test_directories(tree: Path, use_openat2: bool) -> None:
    root = Root(tree, use_openat2=use_openat2)
    opened = root.open((), "dir")
    assert opened.is_dir
    assert "notes.txt" in os.listdir(opened.fd)
    opened.close()
    with pytest.raises(PathError) as caught:
        root.open(("notes.txt",), "dir")
    assert caught.value.code == 405
    root.close()


@pytest.mark.parametrize("use_openat2", RESOLVERS)
def test_fifo_never_blocks(tree: Path, use_openat2: bool) -> None:
    """A FIFO with no writer is refused at once (the test would hang)."""
    root = Root(tree, use_openat2=use_openat2)
    for _ in range(3):
        with pytest.raises(PathError):
            root.open(("fifo",), "any")
    root.close()


def _swapper(stop: threading.Event, swaps: list[tuple[str, str]], at: Path) -> None:
    """Replace C{at} with each symlink target in turn until told to stop."""
    temp = at.with_name(at.name + ".swap")
    n = 0
    while not stop.is_set() and n < 200_000:
        target, _ = swaps[n % len(swaps)]
        os.symlink(target, temp)
        os.replace(temp, at)
        n += 1


@pytest.mark.parametrize("use_openat2", RESOLVERS)
@pytest.mark.parametrize("level", ["file", "dir"])
def test_swap_loop(tree: Path, use_openat2: bool, level: str) -> None:
    """
    A symlink flipping between inside and outside during 300 requests:
    every request is either refused or served inside bytes, never a canary.
    """
    (tree / "real").mkdir()
    (tree / "real" / "x").write_bytes(b"inside\n")
    if level == "file":
        at, raw = tree / "flip", b"flip"
        swaps = [("real/x", "in"), ("../canary", "out"), ("../files-secret/x", "out")]
    else:
        at, raw = tree / "flip", b"flip/x"
        swaps = [("real", "in"), ("../files-secret", "out"), ("..", "out")]
    os.symlink(swaps[0][0], at)
    root = Root(tree, use_openat2=use_openat2)
    stop = threading.Event()
    thread = threading.Thread(target=_swapper, args=(stop, swaps, at), daemon=True)
    thread.start()
    served = refused = 0
    try:
        for _ in range(300):
            try:
                data = read_all(root, raw)
            except PathError as e:
                assert e.code in (403, 404), e.reason
                refused += 1
            else:
                assert data == b"inside\n"
                served += 1
    finally:
        stop.set()
        thread.join(5)
        root.close()
    assert served + refused == 300
