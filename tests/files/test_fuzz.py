"""
Property-based fuzzing of the file server: arbitrary request streams
(uploads included), split at arbitrary points, through
L{sockd.files.protocol.FileProtocol} on an in-memory transport; and arbitrary paths
through L{sockd.files.paths.Root}.  Canary files sit beside and above the root:
no byte of theirs may ever come back, and nothing outside the root changes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import sockd.files.codec as codec
from sockd.files.paths import PathError, Root, openat2_available
from sockd.files.protocol import FileFactory
from sockd.files.state import FileState
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
    symlinks that lead out of it in every way, and to hidden names in it.
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
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(CANARY)
    os.symlink(".hidden", root / "vis")
    os.symlink(".git", root / "gitlink")
    os.symlink("../.git/config", root / "sub" / "config")
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
    "vis", "gitlink", "gitlink/config", "sub/config", "sub_link/config",
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
NEW = st.sampled_from([b"new.txt", b"sub/new", b"a%20b", b"n%C3%A9", b"new/x"])
#: uploads (refused unless writable): a body that is short, exact or long
PUT = st.builds(
    lambda name, body, delta: b"PUT %s %d\n%s" % (name, len(body) + delta, body),
    st.one_of(NAME, PATH, NEW, NEW),
    st.binary(max_size=8),
    st.sampled_from([0, 0, 0, -1, 1]),
)
REQUEST = st.one_of(GOOD, GOOD, NOISY, PUT)
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
    st.builds(lambda a, b: a + b, REQUESTS, st.binary(max_size=20)),
    st.builds(lambda a, b: a + b, st.binary(max_size=20), REQUESTS),
    st.one_of(
        st.binary(max_size=60),
        st.sampled_from([b"GET " + b"x" * codec.MAX_LINE, b"x" * (codec.MAX_LINE + 1)]),
    ),
)
#: how the exchange ends: the client half-closes, pauses, stops, or is too
#: slow for the request timeout; or the daemon shuts down
ENDING = st.sampled_from(["half-close", "pause", "wait", "timeout", "shutdown"])

# --- answers ----------------------------------------------------------------

SHUTTING_DOWN = b"ERR 503 shutting down\r\n"
#: endings during which the bare-request pause runs out
PAUSED = ("pause", "timeout")
GET_HEADER = re.compile(rb"OK (\d+) size=(\d+) mtime=\d+")
LINE_ANSWER = {
    b"STAT": re.compile(rb"OK type=(file|dir) size=\d+ mtime=\d+"),
    b"SUM": re.compile(rb"OK sha256=[0-9a-f]{64} size=\d+ mtime=\d+"),
    b"QUIT": re.compile(rb"OK bye"),
}
ERR = re.compile(rb"ERR [1-5]\d\d [ -~]+")
LIST_LINE = re.compile(rb"[fd] \d+ \d+ [!-~]+")
MTIMES = re.compile(rb"(mtime=|^[fd] \d+ )\d+", re.MULTILINE)
HELP_LINES = {line for line in codec.HELP.splitlines()}
MENU_LINE = re.compile(rb"[0159ghsI][^\t\r\n]+\t/[^\t\r\n]+\t127\.0\.0\.1\t9000")
#: the answer to a Gopher selector that failed
ERROR_ITEM = re.compile(rb"3[1-5]\d\d [ -~]+\t\terror\.host\t1\r\n\.\r\n")


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


def snapshot(top: Path, root: Path) -> dict[str, bytes | None]:
    """Every name under C{top} outside C{root}, with a regular file's bytes."""
    seen: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == root:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            regular = path.is_file() and not path.is_symlink()
            seen[str(path)] = path.read_bytes() if regular else None
    return seen


def servable(root: Path) -> list[bytes]:
    """The bytes of every regular file beneath C{root}, hidden ones excepted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if name[0] != "."]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink() and name[0] != ".":
                found.append(path.read_bytes())
    return found


class ProtocolFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.problems: list[str] = []
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event: dict[str, Any]) -> None:
        if not str(event.get("log_namespace", "")).startswith("sockd"):
            return
        if "log_failure" in event:
            self.problems.append(f"failure logged: {event['log_failure']}")
        text = formatEvent(event)
        if re.search("[\x00-\x1f\x7f-\x9f]", text):
            self.problems.append(f"unescaped log line: {text!r}")

    def drive(
        self, root: Path, chunks: list[bytes], ending: str, keys: dict[str, str]
    ) -> tuple[Any, bytes]:
        """Feed C{chunks} to a fresh connection; run it until it settles."""
        clock = Clock()
        config = parse_settings(file={"root": str(root), "enabled": "true", **keys})
        state = FileState(config.file, clock)
        factory = FileFactory(state, clock, abort_grace=5)
        protocol, transport = connect(factory)
        try:
            for chunk in chunks:
                protocol.dataReceived(chunk)
            if ending == "half-close" and transport.connected:
                protocol.readConnectionLost()
            elif ending == "pause":
                clock.advance(state.settings.bare_pause + 0.01)
            elif ending == "timeout":
                clock.advance(state.settings.request_timeout + 0.01)
            elif ending == "shutdown":
                protocol.shutdown()
            for _ in range(500):
                producer = transport.producer
                if producer is not None and producer is not transport:
                    producer.resumeProducing()
                elif any(c.getTime() <= clock.seconds() for c in clock.calls):
                    clock.advance(0)
                else:
                    break
            else:
                raise AssertionError("the connection did not settle")
            return protocol, bytes(transport.value())
        finally:
            if transport.connected:
                transport.loseConnection()
            state.root.close()
            self.assertEqual(factory.limiter.total, 0)

    @given(
        stream=STREAM,
        cuts=st.lists(st.integers(min_value=0), max_size=6),
        ending=ENDING,
        bare_errors=st.sampled_from(["close", "line"]),
        symlinks=st.sampled_from(["inside", "refuse"]),
        writable=st.booleans(),
    )
    @settings(
        max_examples=500,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    def test_any_stream(
        self,
        stream: bytes,
        cuts: list[int],
        ending: str,
        bare_errors: str,
        symlinks: str,
        writable: bool,
    ) -> None:
        keys = {"bare_errors": bare_errors, "symlinks": symlinks}
        keys["writable"] = str(writable).lower()
        keys["upload_allow"] = "0.0.0.0/0 ::/0"
        outs = []
        for chunks in (split(stream, cuts), [stream]):
            top = Path(tempfile.mkdtemp(prefix="sockd-fuzz-"))
            try:
                root = make_tree(top)
                before = snapshot(top, root)
                protocol, out = self.drive(root, chunks, ending, keys)
                # Nothing outside the root is read, written or created.
                self.assertNotIn(CANARY, out)
                self.assertNotIn(CANARY[:12], out)
                self.assertEqual(snapshot(top, root), before)
                uploading = [
                    name
                    for _, _, names in os.walk(root)
                    for name in names
                    if name.startswith(".sockd-upload.")
                ]
                self.assertEqual(uploading, [])  # closed: no temporary left
                self.assertEqual(self.problems, [])
                contents = servable(root)
                if protocol.mode == "framed":
                    self.check_framed(stream, ending, out, contents)
                elif protocol.mode == "bare":
                    self.check_bare(out, contents)
                else:
                    # No request complete: nothing, or the line-too-long error.
                    too_long = b"ERR 414 request line longer than %d bytes\r\n"
                    self.assertIn(out, [b"", too_long % codec.MAX_LINE])
                outs.append(out)
            finally:
                shutil.rmtree(top)
        # Where the reads end changes nothing (but the trees' times).
        self.assertEqual(*(MTIMES.sub(rb"\1T", out) for out in outs))

    def check_bare(self, out: bytes, contents: list[bytes]) -> None:
        if out in contents or ERR.fullmatch(out.removesuffix(b"\r\n")):
            return
        if ERROR_ITEM.fullmatch(out):
            return
        self.assertTrue(out.endswith(b".\r\n"), out)
        for line in out.split(b"\r\n")[:-2]:
            self.assertRegex(line, MENU_LINE)

    def check_framed(
        self, stream: bytes, ending: str, out: bytes, contents: list[bytes]
    ) -> None:
        """Each request answered, in order, framing intact."""
        answers = Scanner(out)
        pos = 0
        while pos < len(stream):
            end = stream.find(b"\n", pos)
            if end >= 0:
                request, pos = stream[pos:end].removesuffix(b"\r"), end + 1
            elif ending == "half-close" or (ending in PAUSED and pos == 0):
                # The last bytes, or a first line ended by the pause (a
                # keyword alone: framed, as at the end of a line).
                request, pos = stream[pos:].rstrip(b"\r"), len(stream)
            else:
                break  # an unfinished line: no answer yet
            assert not answers.done(), ("request not answered", request, out)
            if self.answer(request, answers, contents):
                break  # the server closed after this answer
            if request.startswith(b"PUT "):
                pos += int(request.split(b" ")[2])  # the body, stored
        rest = out[answers.pos :]
        if ending == "shutdown" and rest == SHUTTING_DOWN:
            return
        self.assertTrue(answers.done(), ("answers left over", rest))

    def answer(self, request: bytes, answers: Scanner, contents: list[bytes]) -> bool:
        """Check the answer to one request; True if the server then closed."""
        word = request.split(b" ", 1)[0]
        line = answers.line()
        if line + b"\r\n" == SHUTTING_DOWN:
            return True  # the daemon stopping, once the request in flight ended
        if line.startswith(b"ERR "):
            self.assertRegex(line, ERR)
            return word == b"PUT" or line.startswith((b"ERR 414", b"ERR 500"))
        if word == b"GET":
            header = GET_HEADER.fullmatch(line)
            assert header is not None, (request, line)
            count, size = int(header.group(1)), int(header.group(2))
            body = answers.body(count)
            matches = [c for c in contents if len(c) == size and body in c]
            self.assertTrue(matches, (request, body))
        elif word in (b"LIST", b"HELP"):
            self.assertEqual(line, b"OK", request)
            while (item := answers.line()) != b".":
                if word == b"LIST":
                    self.assertRegex(item, LIST_LINE)
                else:
                    self.assertIn(item, HELP_LINES)
        elif word == b"PUT":
            self.assertEqual(line, b"OK ready", request)
            if answers.done():
                return False  # the body is still to come
            stored = answers.line()
            if stored.startswith(b"ERR "):
                self.assertRegex(stored, ERR)
                return True
            self.assertRegex(stored, rb"OK stored \d+ sha256=[0-9a-f]{64}")
        else:
            assert word in LINE_ANSWER, (request, line)
            self.assertRegex(line, LINE_ANSWER[word])
            return word == b"QUIT"
        return False


class PauseTests(SynchronousTestCase):
    def test_keyword_split_before_its_space_waits_for_the_line(self) -> None:
        """Found by test_any_stream: "G" then "ET notes.txt" started the
        bare-request pause on "G"; it went on running, and fired on a framed
        request that had no line ending yet, cutting it short."""
        root = make_tree(tempdir(self))
        clock = Clock()
        config = parse_settings(file={"root": str(root), "enabled": "true"})
        state = FileState(config.file, clock)
        self.addCleanup(state.root.close)
        protocol, transport = connect(FileFactory(state, clock, abort_grace=5))
        protocol.dataReceived(b"G")
        protocol.dataReceived(b"ET notes")
        clock.advance(state.settings.bare_pause + 0.01)
        self.assertEqual(transport.value(), b"")  # waiting for the line's end
        protocol.dataReceived(b".txt 6\n")
        for _ in range(10):
            if transport.producer in (None, transport):
                break
            transport.producer.resumeProducing()
        self.assertEqual(transport.value().split(b"\r\n", 1)[1], b"notes\n")
        transport.loseConnection()


class ResolverFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = make_tree(tempdir(self))
        self.real = os.path.realpath(self.path)
        resolvers = [False, True] if openat2_available() else [False]
        self.roots = [
            Root(self.path, symlinks, use_openat2=use_openat2)
            for use_openat2 in resolvers
            for symlinks in ("inside", "refuse")
        ]
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
