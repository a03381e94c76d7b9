"""
Tests for L{sockd.files.gopher}, in memory: item types by name and first
bytes, menu lines, error items, the advertised address, and gophermaps
(malicious ones too).
"""

from __future__ import annotations

import pytest

from sockd.files import gopher
from sockd.files.gopher import GopherMap, Item, MenuFormat, parse_map


def no_head() -> bytes:
    raise AssertionError("the name decides: nothing should be read")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("notes.txt", "0"),
        ("README.MD", "0"),
        ("index.html", "h"),
        ("page.HTM", "h"),
        ("cat.gif", "g"),
        ("photo.jpeg", "I"),
        ("logo.png", "I"),
        ("song.mp3", "s"),
        ("take.flac", "s"),
        ("src.tar.gz", "5"),
        ("bundle.zip", "5"),
        ("image.iso", "9"),
        ("paper.pdf", "9"),
    ],
)
def test_type_by_name(name: str, kind: str) -> None:
    assert gopher.item_type(name, False, no_head) == kind


def test_directory_whatever_its_name() -> None:
    assert gopher.item_type("pics.png", True, no_head) == "1"


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"", "0"),  # an empty file reads as text
        (b"plain words\nand lines\r\n\tindented\x0c", "0"),
        (b"\x1b[1mbold\x1b[0m art\n", "0"),  # ANSI art is text
        ("é and ü".encode() * 3, "0"),
        ("aaa€".encode()[:-1], "0"),  # a character cut by the prefix's end
        (b"\x7fELF\x02\x01\x01\x00", "9"),
        (b"text then a NUL\x00", "9"),
        (b"\xff\xfe\x00\x00", "9"),
        (b"latin-1 caf\xe9 au lait", "9"),  # not UTF-8
        (b"\x89PNG\r\n\x1a\n", "9"),
    ],
)
def test_type_by_first_bytes_when_the_name_does_not_say(head: bytes, kind: str) -> None:
    assert gopher.item_type("Makefile", False, lambda: head) == kind
    assert gopher.item_type("data.unknown", False, lambda: head) == kind


def test_menu_lines() -> None:
    form = MenuFormat("gopher.example.org", 7070)
    items = [
        Item("0", "notes.txt", "/notes.txt"),
        Item("1", "sub dir", "/sub dir"),
        Item("i", "Welcome\tto\r\nhere\x1b[2J"),
        Item("1", "Floodgap", "/", "gopher.floodgap.com", 70),
    ]
    assert form.lines(items) == (
        b"0notes.txt\t/notes.txt\tgopher.example.org\t7070\r\n"
        b"1sub dir\t/sub dir\tgopher.example.org\t7070\r\n"
        b"iWelcome to??here?[2J\t\tgopher.example.org\t7070\r\n"
        b"1Floodgap\t/\tgopher.floodgap.com\t70\r\n"
    )
    assert form.end("") == b".\r\n"
    assert form.end("more than 3 entries") == (
        b"itruncated: more than 3 entries\t\tgopher.example.org\t7070\r\n.\r\n"
    )
    assert form.head == b""


def test_error_item() -> None:
    assert gopher.error_item(404, "not found") == (
        b"3404 not found\t\terror.host\t1\r\n.\r\n"
    )
    # Whatever a reason holds, it stays one field of one line.
    sneaky = gopher.error_item(403, "a\tb\r\n0evil\tx\th\t1\x1b]0;t\x07")
    assert sneaky == b"3403 a b??0evil x h 1?]0;t?\t\terror.host\t1\r\n.\r\n"
    assert sneaky.count(b"\t") == 3
    assert sneaky.count(b"\r\n") == 2


def test_clean() -> None:
    assert gopher.clean("a\tb\rc\nd\x00e\x7ff\x9bg ü") == "a b?c?d?e?f?g ü"


@pytest.mark.parametrize(
    ("settings", "address", "expected"),
    [
        (("", None), ("127.0.0.1", 8898), ("127.0.0.1", 8898)),
        (("", None), ("::ffff:192.0.2.1", 70), ("192.0.2.1", 70)),
        (("", None), ("fe80::1%eth0", 70), ("fe80::1", 70)),
        (
            ("gopher.example.org", None),
            ("10.0.0.2", 8898),
            ("gopher.example.org", 8898),
        ),
        (("", 70), ("10.0.0.2", 8898), ("10.0.0.2", 70)),
        (("gopher.example.org", 70), ("10.0.0.2", 8898), ("gopher.example.org", 70)),
        (("", None), (None, None), ("localhost", 70)),  # a UNIX socket
        (("h.example", 7070), (None, None), ("h.example", 7070)),
    ],
)
def test_advertised(
    settings: tuple[str, int | None],
    address: tuple[object, object],
    expected: tuple[str, int],
) -> None:
    assert gopher.advertised(*settings, *address) == expected


# --- gophermaps -----------------------------------------------------------------


def test_map_lines_in_order() -> None:
    parsed = parse_map(
        b"Welcome to the archive.\n"
        b"\n"
        b"# a comment, never shown\n"
        b"0Read me first\tREADME.txt\n"
        b"1Pictures\t/pics\n"
        b"9The data\n"
        b"0Same name\t\n"
        b"1Floodgap\t/\tgopher.floodgap.com\t70\n"
        b"hA site\tURL:https://example.org/\texample.org\n"
        b"iinfo with a tab\tignored\n"
        b"*\n"
        b"after the star: not read\n"
    )
    assert parsed == GopherMap(
        (
            Item("i", "Welcome to the archive."),
            Item("i", ""),
            Item("0", "Read me first", "README.txt"),
            Item("1", "Pictures", "/pics"),
            Item("i", "9The data"),  # no tab: text
            Item("0", "Same name", "Same name"),  # no selector: the display
            Item("1", "Floodgap", "/", "gopher.floodgap.com", 70),
            Item("h", "A site", "URL:https://example.org/", "example.org", 70),
            Item("i", "info with a tab"),
        ),
        rest=True,
        dropped=(),
    )


def test_map_without_a_star_is_the_whole_menu() -> None:
    parsed = parse_map(b"only this\r\n0one\tone.txt\r\n.\r\n0not read\tx\r\n")
    assert parsed == GopherMap(
        (Item("i", "only this"), Item("0", "one", "one.txt")), False, ()
    )
    assert parse_map(b"") == GopherMap((), False, ())
    assert parse_map(b"\n") == GopherMap((Item("i", ""),), False, ())


def test_malicious_map_lines_are_dropped() -> None:
    parsed = parse_map(
        b"=/bin/sh -c 'rm -rf /'\n"
        b"=./script.sh\n"
        b"3Fake error\t\terror.host\t1\n"
        b"3\n"  # no tab: text, not an error item
        b"Xstrange\tx\n"
        b"0bad sel\tx\x1b[2Jy\n"
        b"0cr in sel\tx\ry\tlocalhost\t70\n"
        b"0bad host\tx\tevil host\t70\n"
        b"0bad port\tx\texample.org\t99999\n"
        b"0word port\tx\texample.org\tseventy\n"
        b"0bad utf-8\tx\xffy\n"
        b"\x1b]0;title\x07 shown\n"
        b"ok \xff text\n"
    )
    assert parsed.lines == (
        Item("i", "3"),
        Item("i", "\x1b]0;title\x07 shown"),  # cleaned when written
        Item("i", "ok \ufffd text"),
    )
    assert parsed.rest is False
    assert [reason.split(": ", 1)[0] for reason in parsed.dropped] == [
        f"line {n}" for n in (1, 2, 3, 5, 6, 7, 8, 9, 10, 11)
    ]
    assert "never run" in parsed.dropped[0]
    assert "type 3" in parsed.dropped[2]
    # Written out, nothing in a display string breaks a line or a field.
    written = MenuFormat("h", 70).lines(list(parsed.lines))
    assert written == (
        b"i3\t\th\t70\r\n"
        b"i?]0;title? shown\t\th\t70\r\n"
        b"iok \xef\xbf\xbd text\t\th\t70\r\n"
    )
