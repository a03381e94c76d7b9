"""
Property-based fuzzing of the file server: arbitrary request streams, split
at arbitrary points, through L{sockd.files.FileProtocol} on an in-memory
transport; and arbitrary paths through L{sockd.paths.Root}.  Canary files
sit beside and above the root: no byte of theirs may ever come back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockd import files
from sockd.files import FileFactory, FileState
from sockd.paths import PathError, Root, openat2_available
from tests.helpers import connect, tempdir
from tests.helpers import settings as parse_settings

CANARY = b"FUZZ-CANARY-5b1d9e-must-never-leave"
NOTES = b"hello notes\n"
INNER = b"inner text\r\n"
SPACED = b"spaced % name\n"
#: every regular file a client may be served, by name
SERVABLE = {
    "notes.txt": NOTES,
    "sub/inner.txt": INNER,
    "with space%.txt": SPACED,
    "empty": b"",
}


def make_tree(top: Path) -> Path:
    """
    top/CANARY, top/srv/canary, top/srv/files-secret/x (the sibling whose
    name starts with the root's), and the root top/srv/files, with
    symlinks that lead out of it in every way.
    """
    (top / "CANARY").write_bytes(CANARY)
    srv = top / "srv"
    srv.mkdir()
    (srv / "canary").write_bytes(CANARY)
    (srv / "files-secret").mkdir()
    (srv / "files-secret" / "x").write_bytes(CANARY)
    root = srv / "files"
    root.mkdir()
    (root / "sub").mkdir()
    for name, content in SERVABLE.items():
        (root / name).write_bytes(content)
    (root / ".hidden").write_bytes(CANARY)
    os.symlink("../canary", root / "out")
    os.symlink("../../CANARY", root / "sub" / "up2")
    os.symlink("../files-secret", root / "secret")
    os.symlink(str(srv / "canary"), root / "abs")
    os.symlink("/proc/self/environ", root / "environ")
    os.symlink("notes.txt", root / "in_link")
    os.symlink("../notes.txt", root / "sub" / "up")
    os.symlink("sub", root / "sub_link")
    os.mkfifo(root / "fifo")
    return root


# --- requests -------------------------------------------------------------

HOSTILE = [
    "..", ".", "...", "....", "/", "//", "\\", "..\\..", "%2e%2e", "%2E%2e%2f",
    "%2f", "%5c", "%00", "\x00", "\uff0e\uff0e", "\uff0e", "\u2024\u2024",
    "\uff0f", "\u2215", "%", "%zz", "%c0%ae%c0%ae", "\u202e", "\x1b[2J",
    "..%2f..%2fCANARY", "../canary", "../../CANARY", "../files-secret/x",
    "files-secret", "out", "sub/up2", "secret/x", "abs", "environ", "fifo",
    ".hidden", "sub/../../canary", "/proc/self/environ", "/etc/passwd", "\t",
]  # fmt: skip
NAMES = [*SERVABLE, "with%20space%25.txt", "in_link", "sub/up", "sub_link/inner.txt"]
NAMES += ["sub", "sub_link", "", "missing", "notes.txt/x", "NOTES.TXT"]
FRAGMENT = st.one_of(
    st.sampled_from(HOSTILE),
    st.sampled_from(NAMES),
    st.text(max_size=6),
)
PATH = st.one_of(
    st.sampled_from(NAMES).map(str.encode),
    st.sampled_from(NAMES).map(str.encode),
    st.lists(FRAGMENT, min_size=1, max_size=4).map("/".join).map(str.encode),
    st.lists(FRAGMENT, max_size=3).map("".join).map(str.encode),
    st.binary(max_size=12),
)
NUMBER = st.sampled_from([b"0", b"1", b"5", b"12", b"13", b"99999999999999999999"])
NUMBER |= st.sampled_from([b"-1", b"x", b"", b"007", b"1e3", b"\xd9\xa3"])
KEYWORD = st.sampled_from([b"GET", b"STAT", b"SUM", b"LIST", b"HELP", b"QUIT"])
WORD = (
    KEYWORD
    | KEYWORD
    | KEYWORD
    | st.sampled_from([b"PUT", b"get", b"FETCH", b"", b"GET\t", b"LIST/"])
)
NOISY = st.builds(
    lambda word, args, end: b" ".join([word, *args]) + end,
    WORD,
    st.lists(st.one_of(PATH, NUMBER), max_size=3),
    st.sampled_from([b"\n", b"\r\n", b"\r\n", b"\n", b"", b"\r", b"\t\n"]),
)
NAME = st.sampled_from(NAMES).map(str.encode)
#: well-formed requests, most of them for files that exist
GOOD = st.one_of(
    st.builds(b"GET %s\r\n".__mod__, NAME),
    st.builds(lambda n, o: b"GET %s %s\n" % (n, o), NAME, NUMBER),
    st.builds(lambda n, o, c: b"GET %s %s %s\n" % (n, o, c), NAME, NUMBER, NUMBER),
    st.builds(b"STAT %s\n".__mod__, NAME),
    st.builds(b"SUM %s\n".__mod__, NAME),
    st.builds(b"LIST %s\n".__mod__, st.sampled_from([b"sub", b"/", b"sub_link"])),
    st.sampled_from([b"LIST\n", b"HELP\r\n", b"QUIT\n", b"PUT new 3\n"]),
)
REQUEST = st.one_of(GOOD, GOOD, NOISY)
BARE = st.builds(
    lambda path, end: path + end,
    PATH,
    st.sampled_from([b"\n", b"\r\n", b"", b"\tgopher+\r\n"]),
)
REQUESTS = st.lists(REQUEST, min_size=1, max_size=6).map(b"".join)
STREAM = st.one_of(
    REQUESTS,
    REQUESTS,
    REQUESTS,
    BARE,
    BARE,
    st.binary(max_size=60),
    st.builds(lambda a, b: a + b, REQUESTS, st.binary(max_size=20)),
    st.builds(lambda a, b: a + b, st.binary(max_size=20), REQUESTS),
    st.sampled_from([b"GET " + b"x" * files.MAX_LINE, b"x" * (files.MAX_LINE + 1)]),
)
#: how the client ends: half-close, a long pause, or just stops
ENDING = st.sampled_from(["half-close", "pause", "wait"])

# --- answers ----------------------------------------------------------------

GET_HEADER = re.compile(rb"OK (\d+) size=(\d+) mtime=\d+")
LINE_ANSWER = {
    b"STAT": re.compile(rb"OK type=(file|dir) size=\d+ mtime=\d+"),
    b"SUM": re.compile(rb"OK sha256=[0-9a-f]{64} size=\d+ mtime=\d+"),
    b"QUIT": re.compile(rb"OK bye"),
}
ERR = re.compile(rb"ERR [1-5]\d\d [ -~]+")
LIST_LINE = re.compile(rb"[fd] \d+ \d+ [!-~]+")
HELP_LINES = {line for line in files.HELP.splitlines()}
MENU_LINE = re.compile(rb"[019][^\t\r\n]+\t/[^\t\r\n]+\t127\.0\.0\.1\t9000")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class Scanner:
    """Reads a framed answer stream one line or body at a time."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def line(self) -> bytes:
        end = self.data.find(b"\r\n", self.pos)
        assert end >= 0, ("unterminated answer line", self.data[self.pos :])
        line = self.data[self.pos : end]
        self.pos = end + 2
        return line

    def body(self, count: int) -> bytes:
        body = self.data[self.pos : self.pos + count]
        assert len(body) == count, ("short body", count, body)
        self.pos += count
        return body


class ProtocolFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = make_tree(tempdir(self))

    def drive(
        self, chunks: list[bytes], ending: str, keys: dict[str, str]
    ) -> tuple[Any, bytes]:
        """Feed C{chunks} to a fresh connection; run it until it settles."""
        clock = Clock()
        config = parse_settings(
            file={"root": str(self.root), "enabled": "true", **keys}
        ).file
        state = FileState(config, clock)
        self.addCleanup(state.root.close)
        factory = FileFactory(state, clock, abort_grace=5)
        protocol, transport = connect(factory)
        try:
            for chunk in chunks:
                protocol.dataReceived(chunk)
            if ending == "half-close" and transport.connected:
                protocol.readConnectionLost()
            elif ending == "pause":
                clock.advance(state.settings.bare_pause + 0.01)
            for _ in range(500):
                producer = transport.producer
                if producer is not None and producer is not transport:
                    producer.resumeProducing()
                elif clock.getDelayedCalls() and any(
                    call.getTime() <= clock.seconds()
                    for call in clock.getDelayedCalls()
                ):
                    clock.advance(0)
                else:
                    break
            else:
                raise AssertionError("the connection did not settle")
            return protocol, bytes(transport.value())
        finally:
            if transport.connected:
                transport.loseConnection()
            self.assertEqual(factory.limiter.total, 0)

    @given(
        stream=STREAM,
        cuts=st.lists(st.integers(min_value=0), max_size=6),
        ending=ENDING,
        bare_errors=st.sampled_from(["close", "line"]),
        symlinks=st.sampled_from(["inside", "refuse"]),
    )
    @settings(
        max_examples=1500,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    def test_any_stream(
        self,
        stream: bytes,
        cuts: list[int],
        ending: str,
        bare_errors: str,
        symlinks: str,
    ) -> None:
        protocol, out = self.drive(
            split(stream, cuts),
            ending,
            {"bare_errors": bare_errors, "symlinks": symlinks},
        )
        self.assertNotIn(CANARY, out)
        self.assertNotIn(CANARY[:12], out)
        if protocol.mode == "framed":
            self.check_framed(stream, ending, out)
        elif protocol.mode == "bare":
            self.check_bare(out)
        else:
            # No request was complete: nothing, or the one line-too-long error.
            self.assertIn(
                out, [b"", b"ERR 414 request line longer than 16384 bytes\r\n"]
            )

    def check_bare(self, out: bytes) -> None:
        if out in SERVABLE.values() or ERR.fullmatch(out.removesuffix(b"\r\n")):
            return
        self.assertTrue(out.endswith(b".\r\n"), out)
        for line in out.split(b"\r\n")[:-2]:
            self.assertRegex(line, MENU_LINE)

    def check_framed(self, stream: bytes, ending: str, out: bytes) -> None:
        """Each request answered, in order, framing intact."""
        requests = stream.split(b"\n")
        tail = requests.pop()
        if ending == "half-close" and tail:
            requests.append(tail)
        answers = Scanner(out)
        closed_by = b""
        answered = 0
        for request in requests:
            if answers.done():
                break
            answered += 1
            word = request.removesuffix(b"\r").split(b" ", 1)[0]
            line = answers.line()
            if line.startswith(b"ERR "):
                self.assertRegex(line, ERR)
                if word == b"PUT" or line.startswith((b"ERR 414", b"ERR 500")):
                    closed_by = line
                continue
            if word == b"GET":
                header = GET_HEADER.fullmatch(line)
                assert header is not None, (request, line)
                count, size = int(header.group(1)), int(header.group(2))
                body = answers.body(count)
                self.assertTrue(
                    any(
                        len(content) == size and body in content
                        for content in SERVABLE.values()
                    ),
                    (request, body),
                )
            elif word in (b"LIST", b"HELP"):
                self.assertEqual(line, b"OK", request)
                while (item := answers.line()) != b".":
                    if word == b"LIST":
                        self.assertRegex(item, LIST_LINE)
                    else:
                        self.assertIn(item, HELP_LINES)
            else:
                assert word in LINE_ANSWER, (request, line)
                self.assertRegex(line, LINE_ANSWER[word])
                if word == b"QUIT":
                    closed_by = line
            if closed_by:
                break
        self.assertTrue(answers.done(), ("answers left over", out[answers.pos :]))
        if not closed_by:
            # Nothing closed the connection early: every line was answered.
            self.assertEqual(answered, len(requests), out)


class ResolverFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = make_tree(tempdir(self))
        self.real = os.path.realpath(self.path)
        self.roots = [Root(self.path, use_openat2=False)]
        if openat2_available():
            self.roots.append(Root(self.path, use_openat2=True))
        for root in self.roots:
            self.addCleanup(root.close)

    @given(
        raw=st.one_of(
            PATH,
            st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=5).map(
                lambda parts: "/".join(parts).encode()
            ),
            st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
        ),
        want=st.sampled_from(["any", "file", "dir"]),
    )
    @settings(max_examples=1000, deadline=None)
    def test_inside_or_refused(self, raw: bytes, want: str) -> None:
        for root in self.roots:
            try:
                opened = root.open(root.parse(raw), want)
            except PathError as e:
                self.assertIn(e.code, (400, 403, 404, 405, 414), e.reason)
                self.assertTrue(e.reason)
                continue
            try:
                where = os.readlink(f"/proc/self/fd/{opened.fd}")
                self.assertTrue(
                    where == self.real or where.startswith(self.real + os.sep),
                    (raw, where),
                )
                if not opened.is_dir:
                    self.assertNotEqual(os.pread(opened.fd, 100, 0), CANARY)
            finally:
                opened.close()
