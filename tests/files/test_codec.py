"""
Tests for L{sockd.files.codec}: requests parsed byte by byte and split at
every point, the pause and end-of-input decisions, body framing, answers
formatted by the server and read back by the client, the percent codec.
"""

from __future__ import annotations

import re

import pytest

from sockd.files import codec
from sockd.files.codec import (
    BareRequest,
    BodyData,
    BodyEnd,
    BodyIncomplete,
    CodecError,
    EndOfInput,
    LineTooLong,
    Mode,
    Request,
    RequestParser,
    Waiting,
)
from sockd.files.names import CAUSES, PathError
from tests.helpers import ROOT

STREAM = (
    b"STAT a%20b\r\n"
    b"PUT up.bin 7\n"
    b"GET x\r\n"  # the body: 7 bytes that look like a request
    b"SGET x 1 2\r\n"  # an unknown command word, for the protocol to refuse
    b"LIST  d\n"  # two spaces: an empty argument
    b"HELP"  # ended by the end of input
)
EXPECTED = [
    Request(b"STAT", (b"a%20b",)),
    Request(b"PUT", (b"up.bin", b"7")),
    BodyData(b"GET x\r\n"),
    BodyEnd(),
    Request(b"SGET", (b"x", b"1", b"2")),
    Request(b"LIST", (b"", b"d")),
    Request(b"HELP", ()),
    EndOfInput(),
]


def run(chunks: list[bytes], end: bool = True) -> list[object]:
    """Feed C{chunks}, accepting every PUT; the events, body bytes merged."""
    parser = RequestParser()
    events: list[object] = []

    def drain() -> None:
        while (event := parser.next_event()) is not None:
            if isinstance(event, BodyData) and events:
                last = events[-1]
                if isinstance(last, BodyData):
                    events[-1] = BodyData(last.data + event.data)
                    continue
            events.append(event)
            if isinstance(event, Request) and event.command == b"PUT":
                parser.expect_body(int(event.args[1]))
            if isinstance(event, EndOfInput):
                return

    for chunk in chunks:
        parser.feed(chunk)
        drain()
    if end:
        parser.end()
        drain()
    return events


def test_whole_stream() -> None:
    assert run([STREAM]) == EXPECTED


def test_split_at_every_point() -> None:
    for i in range(len(STREAM) + 1):
        assert run([STREAM[:i], STREAM[i:]]) == EXPECTED, i


def test_split_at_every_pair_of_points() -> None:
    n = len(STREAM)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert run([STREAM[:i], STREAM[i:j], STREAM[j:]]) == EXPECTED, (i, j)


def test_byte_by_byte() -> None:
    assert run([bytes((b,)) for b in STREAM]) == EXPECTED


def test_bare_request_and_the_mode() -> None:
    parser = RequestParser()
    assert parser.mode is Mode.UNDECIDED
    parser.feed(b"docs/a.txt\tgopher+ extra\r\nGET x\n")
    assert parser.next_event() == BareRequest(b"docs/a.txt", gopher=True)
    assert parser.mode is Mode.BARE
    # Once bare, always bare: a keyword is just a selector now.
    assert parser.next_event() == BareRequest(b"GET x")


@pytest.mark.parametrize(
    ("sent", "ending", "expected"),
    [
        # What Gopher clients send (curl, lynx: the selector and CR LF).
        (b"/nope.txt\r\n", "", BareRequest(b"/nope.txt", gopher=True)),
        (b"\r\n", "", BareRequest(b"", gopher=True)),
        (b"/a\t+\r\n", "", BareRequest(b"/a", gopher=True)),
        (b"/a\t$\n", "", BareRequest(b"/a", gopher=True)),
        (b"/a\tsearch", "end", BareRequest(b"/a", gopher=True)),
        # What netcat users send: LF, or no line ending at all.
        (b"notes.txt\n", "", BareRequest(b"notes.txt")),
        (b"/notes.txt\n", "", BareRequest(b"/notes.txt")),
        (b"\n", "", BareRequest(b"")),
        (b"notes.txt", "end", BareRequest(b"notes.txt")),
        (b"notes.txt\r", "end", BareRequest(b"notes.txt")),
        (b"notes.txt\r", "pause", BareRequest(b"notes.txt")),
    ],
)
def test_a_gopher_selector_is_told_from_a_netcat_line(
    sent: bytes, ending: str, expected: BareRequest
) -> None:
    parser = RequestParser()
    parser.feed(sent)
    if ending == "pause":
        assert parser.next_event() is None
        assert parser.pause() == expected
        return
    if ending == "end":
        parser.end()
    assert parser.next_event() == expected


def test_a_keyword_without_arguments_is_framed() -> None:
    assert run([b"HELP\nQUIT\n"]) == [
        Request(b"HELP", ()),
        Request(b"QUIT", ()),
        EndOfInput(),
    ]


def test_pause_decision() -> None:
    parser = RequestParser()
    assert parser.waiting() is Waiting.NOTHING
    parser.feed(b"notes")
    assert parser.next_event() is None
    assert parser.waiting() is Waiting.PAUSE
    parser.feed(b".txt\r")
    assert parser.waiting() is Waiting.PAUSE
    assert parser.pause() == BareRequest(b"notes.txt")
    assert parser.waiting() is Waiting.NOTHING
    assert parser.mode is Mode.BARE


def test_a_keyword_then_a_space_waits_for_its_line() -> None:
    parser = RequestParser()
    for byte in b"GET":
        parser.feed(bytes((byte,)))
        assert parser.waiting() is Waiting.PAUSE  # may yet be a bare name
    parser.feed(b" x")
    assert parser.waiting() is Waiting.LINE
    assert parser.pause() is None
    parser.feed(b"\n")
    assert parser.next_event() == Request(b"GET", (b"x",))


def test_a_paused_keyword_alone_is_framed() -> None:
    parser = RequestParser()
    parser.feed(b"GET")
    assert parser.pause() == Request(b"GET", ())
    assert parser.mode is Mode.FRAMED
    parser.feed(b"na")
    assert parser.waiting() is Waiting.LINE  # no pause once framed
    assert parser.pause() is None


def test_line_limits() -> None:
    longest = b"x" * codec.MAX_LINE + b"\n"
    assert run([longest]) == [BareRequest(b"x" * codec.MAX_LINE), EndOfInput()]
    parser = RequestParser()
    parser.feed(b"GET " + b"x" * codec.MAX_LINE)
    assert parser.next_event() == LineTooLong()
    parser.feed(b"\nHELP\n")
    assert parser.next_event() is None  # nothing more is parsed
    assert run([b"x" * (codec.MAX_LINE + 1) + b"\n"], end=False) == [LineTooLong()]


def test_end_of_input_ends_the_last_line() -> None:
    assert run([b"STAT a\r\r"]) == [Request(b"STAT", (b"a",)), EndOfInput()]
    assert run([b""]) == [EndOfInput()]
    assert run([b"STAT a"], end=False) == []


def test_body_framing() -> None:
    parser = RequestParser()
    parser.expect_body(0)
    assert parser.next_event() == BodyEnd()
    parser.expect_body(5)
    with pytest.raises(RuntimeError):
        parser.expect_body(1)
    parser.feed(b"abc")
    assert parser.next_event() == BodyData(b"abc")
    assert parser.next_event() is None
    assert parser.waiting() is Waiting.BODY
    parser.end()
    assert parser.next_event() == BodyIncomplete(2)


def test_body_bytes_are_never_parsed_as_requests() -> None:
    body = b"x" * (codec.MAX_LINE * 2)  # no newline, longer than a line
    events = run([b"PUT a %d\n" % len(body), body, b"HELP\n"])
    assert events == [
        Request(b"PUT", (b"a", b"%d" % len(body))),
        BodyData(body),
        BodyEnd(),
        Request(b"HELP", ()),
        EndOfInput(),
    ]


# --- answers ------------------------------------------------------------------

ANSWERS: list[tuple[codec.Answer, bytes]] = [
    (codec.GetHeader(3, 10, 1700000000), b"OK 3 size=10 mtime=1700000000\r\n"),
    (codec.StatAnswer("dir", 4096, 5), b"OK type=dir size=4096 mtime=5\r\n"),
    (
        codec.SumAnswer("ab" * 32, 0, 7),
        b"OK sha256=" + b"ab" * 32 + b" size=0 mtime=7\r\n",
    ),
    (codec.Ready(), b"OK ready\r\n"),
    (codec.Stored(9, "0f" * 32), b"OK stored 9 sha256=" + b"0f" * 32 + b"\r\n"),
    (codec.Bye(), b"OK bye\r\n"),
    (codec.Ok(), b"OK\r\n"),
    (codec.Failure(404, "no such file"), b"ERR 404 no such file\r\n"),
    (
        codec.Failure(403, "hidden files are not served", "hidden"),
        b"ERR 403 hidden: hidden files are not served\r\n",
    ),
    (codec.ListLine("f", 12, 3, b"a b%\xff"), b"f 12 3 a%20b%25%FF\r\n"),
    (codec.ListEnd(), b".\r\n"),
    (codec.ListEnd("more than 5 entries"), b"truncated more than 5 entries\r\n.\r\n"),
]


@pytest.mark.parametrize(("answer", "wire"), ANSWERS)
def test_send(answer: codec.Answer, wire: bytes) -> None:
    assert codec.send(answer) == wire


def test_help_text_ends_with_a_dot() -> None:
    lines = codec.send(codec.Help()).split(b"\r\n")
    assert lines[0] == b"OK" and lines[-2:] == [b".", b""]
    assert lines[1:-2] == codec.HELP.splitlines()


def _client_reads(answer: codec.Answer, line: bytes) -> object:
    """What the client makes of one answer line, as it would expect it."""
    if isinstance(answer, codec.ListLine | codec.ListEnd):
        return codec.parse_list_line(line)
    text = codec.parse_answer(line)
    if isinstance(text, codec.Failure):
        return text
    parse = {
        codec.GetHeader: codec.parse_get,
        codec.StatAnswer: codec.parse_stat,
        codec.SumAnswer: codec.parse_sum,
        codec.Ready: codec.parse_ready,
        codec.Stored: codec.parse_stored,
    }.get(type(answer))
    return text if parse is None else parse(text)


@pytest.mark.parametrize(("answer", "wire"), ANSWERS)
def test_round_trip(answer: codec.Answer, wire: bytes) -> None:
    lines = wire.split(b"\r\n")[:-1]
    if isinstance(answer, codec.ListEnd) and answer.truncated:
        assert codec.parse_list_line(lines[0]) == answer.truncated
        assert codec.parse_list_line(lines[1]) == codec.ListEnd()
        return
    (line,) = lines
    read = _client_reads(answer, line)
    if isinstance(answer, codec.Bye | codec.Ok):
        assert read == {codec.Bye: "bye", codec.Ok: ""}[type(answer)]
    else:
        assert read == answer


def test_round_trip_every_byte_in_a_name() -> None:
    name = bytes(range(256))
    line = codec.send(codec.ListLine("d", 0, 0, name))
    assert line.count(b"\n") == 1 and b" " not in line.split(b" ", 3)[3]
    assert codec.parse_list_line(line[:-2]) == codec.ListLine("d", 0, 0, name)


@pytest.mark.parametrize(
    ("parse", "text", "what"),
    [
        (codec.parse_get, "size=1 mtime=2", "GET answer without a length"),
        (codec.parse_get, "1 size=x mtime=2", "answer without a valid size"),
        (codec.parse_get, "\u00b2 size=1 mtime=2", "GET answer without a length"),
        (codec.parse_stat, "type=link size=1 mtime=2", "STAT answer without a type"),
        (codec.parse_stat, "type=file size=1", "answer without a valid mtime"),
        (codec.parse_sum, "sha256=abc size=1 mtime=2", "SUM answer without a sha256"),
        (codec.parse_ready, "stored", "PUT answer is not 'ready'"),
        (codec.parse_stored, "stored x sha256=" + "a" * 64, "unexpected PUT answer"),
        (codec.parse_stored, "stored 1 sha256=" + "g" * 64, "unexpected PUT answer"),
    ],
)
def test_bad_answers(parse: object, text: str, what: str) -> None:
    assert callable(parse)
    with pytest.raises(CodecError) as caught:
        parse(text)
    assert (caught.value.what, caught.value.text) == (what, text)


@pytest.mark.parametrize(
    "line", [b"f 1 2", b"x 1 2 n", b"f -1 2 n", b"f 1 \xc2\xb2 n", b"", b"OK"]
)
def test_bad_list_lines(line: bytes) -> None:
    with pytest.raises(CodecError, match="bad LIST line"):
        codec.parse_list_line(line)


def test_status_lines() -> None:
    assert codec.parse_answer(b"OK") == ""
    assert codec.parse_answer(b"OK 1 size=1") == "1 size=1"
    assert codec.parse_answer(b"ERR 503 shutting down") == codec.Failure(
        503, "shutting down"
    )
    assert codec.parse_list_line(b"truncated") == "no reason given"
    for bad in (b"OKAY", b"ERR x y", b"ERR", b"hello"):
        with pytest.raises(CodecError, match="unexpected answer"):
            codec.parse_answer(bad)


def test_only_a_known_cause_is_read_as_one() -> None:
    read = codec.parse_answer
    hidden = read(b"ERR 403 hidden: hidden files are not served")
    assert hidden == codec.Failure(403, "hidden files are not served", "hidden")
    # A reason that merely starts with a word and a colon keeps it.
    for line, reason in [
        (b"ERR 400 usage: GET <path>", "usage: GET <path>"),
        (b"ERR 403 private: a cause not known here", "private: a cause not known here"),
        (b"ERR 403 hidden:no space", "hidden:no space"),
        (b"ERR 403 hidden files are not served", "hidden files are not served"),
    ]:
        assert read(line) == codec.Failure(int(line[4:7]), reason)


def test_causes_are_documented() -> None:
    # docs/protocol-file.md's table of causes is this table.
    text = (ROOT / "docs" / "protocol-file.md").read_text()
    section = text.split("### Causes", 1)[1].split("\n## ", 1)[0]
    documented = dict(
        re.findall(r"^\| `([a-z][a-z0-9-]*)` \| (\d{3}) \|", section, re.M)
    )
    assert documented == {cause: str(code) for cause, (code, _) in CAUSES.items()}


# --- the percent codec ----------------------------------------------------------


def test_percent_round_trip_every_byte() -> None:
    raw = bytes(range(256))
    encoded = codec.percent_encode(raw)
    assert set(encoded) <= set(range(0x21, 0x7F))
    assert codec.percent_decode(encoded) == raw
    assert codec.percent_decode(b"%c3%A9") == b"\xc3\xa9"  # hex in either case


def test_percent_decode_strict_and_lenient() -> None:
    assert codec.percent_decode(b"%41%62") == b"Ab"
    for bad in (b"100%", b"%zz", b"%4"):
        with pytest.raises(PathError) as caught:
            codec.percent_decode(bad)
        assert caught.value.code == 400
        assert codec.percent_decode(bad, strict=False) == bad
    assert codec.percent_decode(b"%%41", strict=False) == b"%A"
