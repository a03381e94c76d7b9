"""
The sockd-file wire protocol (C{docs/protocol-file.md}) without I/O, in the
manner of h11: L{RequestParser} turns the bytes a client sends into events
(L{Request}, L{BareRequest}, L{BodyData}...), L{send} turns an answer into
bytes, and the C{parse_*} functions read the server's answers back for the
client.  The percent codec of paths and names lives here too.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from sockd.files.names import CAUSES, PathError

__all__ = [
    "KEYWORDS",
    "MAX_LINE",
    "BareRequest",
    "BodyData",
    "BodyEnd",
    "BodyIncomplete",
    "Bye",
    "CodecError",
    "EndOfInput",
    "Event",
    "Failure",
    "GetHeader",
    "Help",
    "HttpStart",
    "LineTooLong",
    "ListEnd",
    "ListLine",
    "Mode",
    "Ok",
    "Ready",
    "Request",
    "RequestParser",
    "StatAnswer",
    "Stored",
    "SumAnswer",
    "Waiting",
    "parse_answer",
    "parse_get",
    "parse_list_line",
    "parse_ready",
    "parse_stat",
    "parse_stored",
    "parse_sum",
    "percent_decode",
    "percent_encode",
    "send",
]

KEYWORDS = frozenset({b"GET", b"STAT", b"SUM", b"LIST", b"HELP", b"QUIT", b"PUT"})
#: longest request line; room for a 4096-byte path written with %XX escapes
MAX_LINE = 16384
HELP = b"""\
sockd-file: commands (one line each; paths with space, % or non-printable
characters are written %XX):
  GET <path> [<offset> [<length>]]   OK <length> size=<n> mtime=<n>, then bytes
  STAT <path>                        OK type=<file|dir> size=<n> mtime=<n>
  SUM <path>                         OK sha256=<hex> size=<n> mtime=<n>
  LIST [<dir>]                       OK, lines <f|d> <size> <mtime> <name>, .
  PUT <path> <length>                OK ready, send <length> bytes, OK stored
  HELP                               this text
  QUIT                               OK bye, then close
A line not starting with a command is a bare request: the file, then close.
"""
_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")
#: an HTTP/1.x request line (RFC 9112 3): an upper-case method, a target
#: and the version; only the first line of a connection is looked at
_HTTP_LINE = re.compile(rb"[A-Z]+ [^ \x00-\x20\x7f]+ HTTP/1\.[0-9]\r?")


# --- the percent codec ------------------------------------------------------


def percent_encode(name: bytes) -> bytes:
    """Space, C{%}, controls and non-ASCII bytes become C{%XX}."""
    return b"".join(bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in name)


def percent_decode(text: bytes, strict: bool = True) -> bytes:
    """
    C{%XX} back to bytes.  A C{%} not followed by two hex digits is an
    error (L{PathError} 400), or with C{strict=False} kept as it is.
    """
    if b"%" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        byte = text[i]
        if byte == 0x25:
            pair = text[i + 1 : i + 3]
            if len(pair) == 2 and set(pair) <= _HEX:
                out.append(int(pair, 16))
                i += 3
                continue
            if strict:
                raise PathError(400, "bad %XX escape in path")
        out.append(byte)
        i += 1
    return bytes(out)


# --- requests: the server's side --------------------------------------------


class Mode(enum.Enum):
    """What the first request made of the connection."""

    UNDECIDED = "undecided"
    BARE = "bare"
    FRAMED = "framed"
    #: HTTP/1.x: from here on the bytes are twisted.web's (L{HttpStart})
    HTTP = "http"


class Waiting(enum.Enum):
    """What the parser needs when it has no event to give."""

    #: nothing buffered
    NOTHING = "nothing"
    #: part of a line: the rest is due before the request deadline
    LINE = "line"
    #: part of a first line that may be a bare request ended by a pause
    #: (a client that sends a name and no newline): see L{RequestParser.pause}
    PAUSE = "pause"
    #: more of an upload's body
    BODY = "body"


@dataclass(frozen=True)
class Request:
    """A framed request line: its command word and its arguments."""

    command: bytes
    args: tuple[bytes, ...]

    @property
    def path(self) -> bytes:
        """The first argument (the path, for every command that takes one)."""
        return self.args[0] if self.args else b""

    @property
    def spaced(self) -> bool:
        """Whether two spaces (or a trailing one) left an empty argument."""
        return b"" in self.args


@dataclass(frozen=True)
class BareRequest:
    """
    A bare request: a selector (what preceded a tab: Gopher clients add
    more); C{gopher} if it came as Gopher clients send one (a line ended
    by CR LF, or with a tab), not as netcat does (LF, a pause, an EOF).
    """

    selector: bytes
    gopher: bool = False


@dataclass(frozen=True)
class HttpStart:
    """
    The first line is an HTTP/1.x request line: C{data} is every byte
    received so far, that line included, for an HTTP parser to take over.
    """

    data: bytes


@dataclass(frozen=True)
class BodyData:
    """Bytes of an upload's body."""

    data: bytes


@dataclass(frozen=True)
class BodyEnd:
    """An upload's body is complete."""


@dataclass(frozen=True)
class BodyIncomplete:
    """The client ended its input before the upload's body was complete."""

    remaining: int


@dataclass(frozen=True)
class LineTooLong:
    """A request line longer than L{MAX_LINE}: nothing more can be parsed."""


@dataclass(frozen=True)
class EndOfInput:
    """The client has sent everything, and every request was given."""


Event = (
    Request
    | BareRequest
    | HttpStart
    | BodyData
    | BodyEnd
    | BodyIncomplete
    | LineTooLong
    | EndOfInput
)


class RequestParser:
    """
    A client's bytes to events, one at a time: L{feed} bytes (and L{end}
    at the end of input), then take L{next_event} until it is None; then
    L{waiting} says what is missing.  After a C{PUT} is accepted,
    L{expect_body} makes the next bytes its body.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.mode = Mode.UNDECIDED
        self.ended = False
        self._buffer = b""
        self._body: int | None = None
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet given as events."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data

    def end(self) -> None:
        """The client's input ended (a half-close)."""
        self.ended = True

    def expect_body(self, length: int) -> None:
        """The next C{length} bytes are an upload's body, then C{BodyEnd}."""
        if self._body is not None:
            raise RuntimeError("a body is already expected")
        self._body = length

    def next_event(self) -> Event | None:
        """The next event, or None until more is fed (see L{waiting})."""
        if self._broken:
            return None
        if self._body is not None:
            return self._bodyEvent()
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end > self.max_line or (end < 0 and len(buffer) > self.max_line):
            return self._tooLong()
        if end >= 0:
            if self.mode is Mode.UNDECIDED and _HTTP_LINE.fullmatch(buffer, 0, end):
                # Before any other framing: HTTP's GET and PUT are keywords.
                self.mode = Mode.HTTP
                self._buffer = b""
                self._broken = True  # nothing more for this parser
                return HttpStart(buffer)
            line, self._buffer = buffer[:end], buffer[end + 1 :]
            if line.endswith(b"\r"):
                return self._request(line[:-1], crlf=True)
            return self._request(line)
        if not self.ended:
            return None
        if buffer:
            # The last request needs no newline: the end of input ends it.
            self._buffer = b""
            return self._request(buffer.rstrip(b"\r"))
        return EndOfInput()

    def waiting(self) -> Waiting:
        """What the parser waits for, once L{next_event} gave None."""
        if self._body is not None:
            return Waiting.BODY
        if not self._buffer:
            return Waiting.NOTHING
        word, space, _ = self._buffer.partition(b" ")
        if self.mode is Mode.UNDECIDED and not (space and word in KEYWORDS):
            return Waiting.PAUSE
        return Waiting.LINE

    def pause(self) -> Request | BareRequest | None:
        """
        The client paused with a first line unterminated (L{Waiting.PAUSE}):
        what is buffered is its request.  None if that no longer applies.
        """
        if self.waiting() is not Waiting.PAUSE:
            return None
        line, self._buffer = self._buffer, b""
        return self._request(line.rstrip(b"\r"))

    def _tooLong(self) -> LineTooLong:
        self._buffer = b""
        self._broken = True
        return LineTooLong()

    def _bodyEvent(self) -> BodyData | BodyEnd | BodyIncomplete | None:
        remaining = self._body
        assert remaining is not None
        if remaining == 0:
            self._body = None
            return BodyEnd()
        buffer = self._buffer
        if not buffer:
            return BodyIncomplete(remaining) if self.ended else None
        if len(buffer) <= remaining:
            self._buffer = b""
            self._body = remaining - len(buffer)
            return BodyData(buffer)
        self._buffer = buffer[remaining:]
        self._body = 0
        return BodyData(buffer[:remaining])

    def _request(self, line: bytes, crlf: bool = False) -> Request | BareRequest:
        word, _, rest = line.partition(b" ")
        if self.mode is Mode.UNDECIDED:
            self.mode = Mode.FRAMED if word in KEYWORDS else Mode.BARE
        if self.mode is Mode.BARE:
            selector, tab, _ = line.partition(b"\t")
            return BareRequest(selector, crlf or bool(tab))
        return Request(word, tuple(rest.split(b" ")) if rest else ())


# --- answers ------------------------------------------------------------------


@dataclass(frozen=True)
class GetHeader:
    """C{GET}'s answer: C{length} bytes follow, of a C{size}-byte file."""

    length: int
    size: int
    mtime: int


@dataclass(frozen=True)
class StatAnswer:
    """C{STAT}'s answer: what a path is."""

    type: str
    size: int
    mtime: int


@dataclass(frozen=True)
class SumAnswer:
    """C{SUM}'s answer: a file's SHA-256 (hex), size and mtime."""

    sha256: str
    size: int
    mtime: int


@dataclass(frozen=True)
class Ready:
    """C{PUT} accepted: the body may follow."""


@dataclass(frozen=True)
class Stored:
    """An upload stored under its name."""

    length: int
    sha256: str


@dataclass(frozen=True)
class Bye:
    """C{QUIT}'s answer, before the server closes."""


@dataclass(frozen=True)
class Ok:
    """A bare C{OK}: a listing (or the help text) follows."""


@dataclass(frozen=True)
class Failure:
    """C{ERR <code> [<cause>: ]<reason>}: C{cause} is one of L{CAUSES}."""

    code: int
    reason: str
    cause: str | None = None


@dataclass(frozen=True)
class ListLine:
    """One entry of a C{LIST} answer; C{name} is the raw (decoded) name."""

    kind: str
    size: int
    mtime: int
    name: bytes


@dataclass(frozen=True)
class ListEnd:
    """The end of a listing; C{truncated} says why it stopped short, if it did."""

    truncated: str = ""


@dataclass(frozen=True)
class Help:
    """The C{HELP} text, then its end."""


Answer = (
    GetHeader
    | StatAnswer
    | SumAnswer
    | Ready
    | Stored
    | Bye
    | Ok
    | Failure
    | ListLine
    | ListEnd
    | Help
)


def _line(text: str) -> bytes:
    return text.encode("utf-8") + b"\r\n"


def send(answer: Answer) -> bytes:
    """The bytes of one answer (a listing's lines: see L{ListLine}, L{ListEnd})."""
    match answer:
        case GetHeader(length, size, mtime):
            return b"OK %d size=%d mtime=%d\r\n" % (length, size, mtime)
        case StatAnswer(kind, size, mtime):
            return _line(f"OK type={kind} size={size} mtime={mtime}")
        case SumAnswer(digest, size, mtime):
            return _line(f"OK sha256={digest} size={size} mtime={mtime}")
        case Ready():
            return b"OK ready\r\n"
        case Stored(length, digest):
            return _line(f"OK stored {length} sha256={digest}")
        case Bye():
            return b"OK bye\r\n"
        case Ok():
            return b"OK\r\n"
        case Failure(code, reason, None):
            return _line(f"ERR {code} {reason}")
        case Failure(code, reason, cause):
            return _line(f"ERR {code} {cause}: {reason}")
        case ListLine(kind, size, mtime, name):
            return b"%s %d %d %s\r\n" % (
                kind.encode(),
                size,
                mtime,
                percent_encode(name),
            )
        case ListEnd(truncated):
            marker = _line(f"truncated {truncated}") if truncated else b""
            return marker + b".\r\n"
        case Help():
            body = b"".join(line + b"\r\n" for line in HELP.splitlines())
            return b"OK\r\n" + body + b".\r\n"
    raise TypeError(f"not an answer: {answer!r}")


# --- answers: the client's side -------------------------------------------------


class CodecError(ValueError):
    """An answer the protocol does not allow: what was wrong, and the text."""

    def __init__(self, what: str, text: str) -> None:
        super().__init__(f"{what}: {text!r}")
        self.what = what
        self.text = text


def parse_answer(line: bytes) -> str | Failure:
    """A status line: the text after C{OK} (C{""} for a bare C{OK}), or a L{Failure}."""
    text = line.decode("utf-8", "replace")
    if text == "OK" or text.startswith("OK "):
        return text[3:]
    if text.startswith("ERR "):
        code, _, reason = text[4:].partition(" ")
        if code.isdigit() and code.isascii():
            # Only a known cause counts: a reason may start "usage: ".
            cause, colon, rest = reason.partition(": ")
            if colon and cause in CAUSES:
                return Failure(int(code), rest, cause)
            return Failure(int(code), reason)
    raise CodecError("unexpected answer", text)


def _fields(text: str) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in text.split() if "=" in item)


def _field(fields: dict[str, str], key: str, answer: str) -> int:
    value = fields.get(key, "")
    if not (value.isdigit() and value.isascii()):
        raise CodecError(f"answer without a valid {key}", answer)
    return int(value)


def _sha256(fields: dict[str, str]) -> str:
    digest = fields.get("sha256", "").lower()
    if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
        return ""
    return digest


def parse_get(text: str) -> GetHeader:
    """The text of C{GET}'s C{OK} line."""
    first, _, rest = text.partition(" ")
    if not (first.isdigit() and first.isascii()):
        raise CodecError("GET answer without a length", text)
    fields = _fields(rest)
    return GetHeader(
        int(first), _field(fields, "size", text), _field(fields, "mtime", text)
    )


def parse_stat(text: str) -> StatAnswer:
    """The text of C{STAT}'s C{OK} line."""
    fields = _fields(text)
    kind = fields.get("type", "")
    if kind not in ("file", "dir"):
        raise CodecError("STAT answer without a type", text)
    return StatAnswer(kind, _field(fields, "size", text), _field(fields, "mtime", text))


def parse_sum(text: str) -> SumAnswer:
    """The text of C{SUM}'s C{OK} line."""
    fields = _fields(text)
    digest = _sha256(fields)
    if not digest:
        raise CodecError("SUM answer without a sha256", text)
    return SumAnswer(
        digest, _field(fields, "size", text), _field(fields, "mtime", text)
    )


def parse_ready(text: str) -> Ready:
    """The text of C{PUT}'s first C{OK} line."""
    if text.split(" ", 1)[0] != "ready":
        raise CodecError("PUT answer is not 'ready'", text)
    return Ready()


def parse_stored(text: str) -> Stored:
    """The text of C{PUT}'s last C{OK} line."""
    word, _, rest = text.partition(" ")
    count, _, rest = rest.partition(" ")
    digest = _sha256(_fields(rest))
    if word != "stored" or not (count.isdigit() and count.isascii()) or not digest:
        raise CodecError("unexpected PUT answer", text)
    return Stored(int(count), digest)


def parse_list_line(line: bytes) -> ListLine | ListEnd | str:
    """
    One line of a listing after its C{OK}: an entry, the end, or (a str)
    the reason given by a C{truncated} line ("no reason given" if none).
    """
    if line == b".":
        return ListEnd()
    word, _, reason = line.partition(b" ")
    if word == b"truncated":
        return reason.decode("utf-8", "replace") or "no reason given"
    parts = line.split(b" ", 3)
    if (
        len(parts) != 4
        or parts[0] not in (b"f", b"d")
        or not (parts[1] and set(parts[1]) <= _DIGITS)
        or not (parts[2] and set(parts[2]) <= _DIGITS)
    ):
        raise CodecError("bad LIST line", line.decode("utf-8", "replace"))
    return ListLine(
        parts[0].decode(),
        int(parts[1]),
        int(parts[2]),
        percent_decode(parts[3], strict=False),
    )
