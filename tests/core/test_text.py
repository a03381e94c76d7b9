"""
The one sanitiser and its profiles: each profile byte for byte on the
tricky characters, and each checked over every code point against the
rule it stands for (the helpers each caller had before the profiles).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from sockd.core.text import (
    JSON,
    LISTING,
    LOG,
    REPLY,
    TERMINAL,
    TERMINAL_RANGES,
    Profile,
    sanitise,
)

#: every code point of the planes in use (bar the surrogates), and each
#: other plane's first and last 4,096 (private use, unassigned, tags)
EVERY = "".join(
    map(
        chr,
        [
            *range(0xD800),
            *range(0xE000, 0x40000),
            *(c for p in range(4, 17) for c in range(p << 16, (p << 16) + 0x1000)),
            *(
                c
                for p in range(4, 17)
                for c in range((p << 16) + 0xF000, (p + 1) << 16)
            ),
        ],
    )
)
#: the surrogates (lone)
SURROGATES = "".join(map(chr, range(0xD800, 0xE000)))
#: the surrogates that stand for undecodable bytes (C{surrogateescape})
ESCAPED = "".join(map(chr, range(0xDC80, 0xDD00)))

#: the characters that trip sanitisers, by name
TRICKY = {
    "nul": "\x00",
    "bell": "\x07",
    "esc sequence": "\x1b[31mred\x1b[0m",
    "osc title": "\x1b]0;owned\x07",
    "del": "\x7f",
    "csi (c1)": "\x9b2J",
    "nel (c1)": "\x85",
    "bare cr": "a\rb",
    "crlf": "a\r\nb",
    "tab": "a\tb",
    "lf": "a\nb",
    "backslash": "a\\b",
    "rlo override": "bidi\u202egnp.exe",
    "isolates": "\u2066x\u2069",
    "lrm": "\u200e",
    "zwsp": "\u200b",
    "zwnj": "\u0645\u200c\u06cc",
    "zwj emoji": "\U0001f469\u200d\U0001f4bb",
    "variation selector": "\u2764\ufe0f",
    "line separator": "a\u2028b",
    "paragraph separator": "a\u2029b",
    "bom": "\ufeff",
    "soft hyphen": "\u00ad",
    "nbsp": "a\u00a0b",
    "tag": "\U000e0041",
    "private use": "\ue000",
    "unassigned": "\u0378",
    "lone surrogate": "bad\udcffutf8",
    "astral": "\U0001f600",
    "latin": "caf\u00e9",
}


# The rules as each caller wrote them before there were profiles.


def _terminal_rule(text: str) -> str:
    table = {c: "\ufffd" for a, b in TERMINAL_RANGES for c in range(a, b + 1)}
    table[0x09] = " "
    return text.replace("\r\n", "\n").translate(table)


def _log_rule(data: bytes | str, limit: int = 200) -> str:
    escapes = {0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    out = []
    for byte in raw[:limit]:
        if byte in escapes:
            out.append(escapes[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    if len(raw) > limit:
        out.append(f"...({len(raw)} bytes)")
    return "".join(out)


def _listing_rule(name: bytes | str) -> str:
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    out = []
    for ch in name:
        if ch == "\\" or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(
                "\\\\"
                if ch == "\\"
                else f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
            )
        else:
            out.append(ch)
    return "".join(out)


def _reply_rule(text: str, limit: int = 300) -> str:
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])


def _json_rule(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


#: longer than any text here: the limits are tested on their own
WHOLE = 10**8

#: each profile, and its rule on uncut text
RULES: list[tuple[Profile, Callable[[str], str]]] = [
    (TERMINAL, _terminal_rule),
    (LOG, lambda text: _log_rule(text, WHOLE)),
    (LISTING, _listing_rule),
    (REPLY, lambda text: _reply_rule(text, WHOLE)),
    (JSON, _json_rule),
]


class EveryCodePointTests(SynchronousTestCase):
    """Each profile does what its rule says, for every code point."""

    def test_every_profile_against_its_rule(self) -> None:
        for profile, rule in RULES:
            # The log once raised on a surrogate no byte escapes to.
            for text in [EVERY, ESCAPED if profile is LOG else SURROGATES]:
                for start in range(0, len(text), 4096):
                    chunk = text[start : start + 4096]
                    self.assertEqual(
                        sanitise(chunk, profile, WHOLE), rule(chunk), profile.name
                    )

    def test_tricky_characters_against_the_rules(self) -> None:
        for profile, rule in RULES:
            for what, text in TRICKY.items():
                for shown in [text, f"x{text}y", f"\u00e9{text}", f"{text}\U0001f600"]:
                    self.assertEqual(
                        sanitise(shown, profile, WHOLE),
                        rule(shown),
                        f"{profile.name}: {what}",
                    )


#: each profile, and what it shows for each input, byte for byte
SHOWN: list[tuple[Profile, dict[bytes | str, str]]] = [
    (
        TERMINAL,
        {
            "\x1b[31mred\x1b[0m": "\ufffd[31mred\ufffd[0m",
            "a\rb": "a\ufffdb",
            "a\r\nb\r\n": "a\nb\n",
            "a\tb": "a b",
            "bidi\u202eevil": "bidi\ufffdevil",
            "a\u2028b\u2029": "a\ufffdb\ufffd",
            "x\u200dy\u200cz": "x\u200dy\u200cz",  # joiners stay
            "bad\udcff": "bad\udcff",  # decoding is the caller's
            "\U000e0041\U0001f600": "\ufffd\U0001f600",
            "\x85\x9b": "\ufffd\ufffd",
        },
    ),
    (
        LOG,
        {
            b"GET /a.txt": "GET /a.txt",
            b'evil\r\n{"x"}\x1b[2J\xff': 'evil\\r\\n{"x"}\\x1b[2J\\xff',
            "tab\there\\": "tab\\there\\\\",
            "caf\u00e9": "caf\\xc3\\xa9",
            "\u202e": "\\xe2\\x80\\xae",
            "\u2028": "\\xe2\\x80\\xa8",
            "bad\udcffutf8": "bad\\xffutf8",  # the byte that came
            b"\xc2\x85\x7f\x00": "\\xc2\\x85\\x7f\\x00",
        },
    ),
    (
        LISTING,
        {
            b"plain name.txt": "plain name.txt",
            "caf\u00e9": "caf\u00e9",
            b"esc\x1b[31mred": "esc\\x1b[31mred",
            b"a\nb\rc\x7f\xc2\x9b": "a\\x0ab\\x0dc\\x7f\\x9b",
            "bidi\u202egnp.exe": "bidi\\u202egnp.exe",
            b"bad\xffutf8": "bad\\\\xffutf8",
            "lone\udcff": "lone\\udcff",
            "a\u2028b\u2029": "a\\u2028b\\u2029",
            "zw\u200bj\u200d": "zw\\u200bj\\u200d",  # every format character
            "tag\U000e0041": "tag\\ue0041",
            "a\\b": "a\\\\b",
            "nb\u00a0sp": "nb\u00a0sp",
        },
    ),
    (
        REPLY,
        {
            "no such file": "no such file",
            "a\r\nb\tc": "a\\r\\nb\\tc",
            "\x1b[2J": "\\x1b[2J",
            "nb\u00a0sp": "nb\\xa0sp",
            "\u202e\u2028": "\\u202e\\u2028",
            "\U000e0041": "\\U000e0041",
            "lone\udcff": "lone\\udcff",
            "a\\b": "a\\b",  # printable
            "\ue000\u0378": "\\ue000\\u0378",
        },
    ),
]


class ByteForByteTests(SynchronousTestCase):
    def test_each_profile(self) -> None:
        for profile, cases in SHOWN:
            for raw, shown in cases.items():
                self.assertEqual(
                    sanitise(raw, profile), shown, f"{profile.name}: {raw!r}"
                )


class TerminalTests(SynchronousTestCase):
    def test_invalid_utf8_is_replaced(self) -> None:
        self.assertEqual(sanitise(b"a\xffb\xc3", TERMINAL), "a\ufffdb\ufffd")

    def test_very_long_text_is_whole(self) -> None:
        text = ("\u00e9\x1b" * 50_000) + "\U0001f600"
        shown = sanitise(text, TERMINAL)
        self.assertEqual(shown, ("\u00e9\ufffd" * 50_000) + "\U0001f600")


class LogTests(SynchronousTestCase):
    def test_cut_at_the_limit_in_bytes(self) -> None:
        self.assertEqual(sanitise(b"x" * 200, LOG), "x" * 200)
        self.assertEqual(sanitise(b"x" * 201, LOG), "x" * 200 + "...(201 bytes)")
        self.assertEqual(
            sanitise("\u00e9\u00e9", LOG, 3), "\\xc3\\xa9\\xc3...(4 bytes)"
        )
        huge = b"\x1b" * 1_000_000
        self.assertEqual(sanitise(huge, LOG, 2), "\\x1b\\x1b...(1000000 bytes)")

    def test_other_lone_surrogates_are_their_bytes(self) -> None:
        # Not an undecodable byte: written as UTF-8 would, never an error.
        self.assertEqual(sanitise("a\ud800b", LOG), "a\\xed\\xa0\\x80b")
        self.assertEqual(sanitise(SURROGATES, LOG, 3), "\\xed\\xa0\\x80...(6144 bytes)")

    def test_always_printable_ascii(self) -> None:
        shown = sanitise(EVERY.encode("utf-8", "surrogatepass"), LOG, 10**7)
        self.assertIsNone(re.search("[^\x20-\x7e]", shown))


class ListingTests(SynchronousTestCase):
    def test_cut_when_asked(self) -> None:
        self.assertEqual(sanitise("\x1b" * 500, LISTING, 300), "\\x1b" * 300)
        self.assertEqual(len(sanitise("x" * 10**6, LISTING)), 10**6)


class ReplyTests(SynchronousTestCase):
    def test_cut_at_300_characters_unmarked(self) -> None:
        self.assertEqual(sanitise("x" * 1000, REPLY), "x" * 300)
        self.assertEqual(sanitise("\x00" * 1000, REPLY), "\\x00" * 300)


class JsonTests(SynchronousTestCase):
    def test_only_lone_surrogates_escaped(self) -> None:
        for text in ["plain", "caf\u00e9 \U0001f600", "\x1b\x00\u202e\u2028"]:
            self.assertEqual(sanitise(text, JSON), text)
        shown = sanitise("bad\udcff\ud800end", JSON)
        self.assertEqual(shown, "bad\\udcff\\ud800end")
        self.assertEqual(json.loads(json.dumps(shown)), shown)


class ProfileTests(SynchronousTestCase):
    """A profile is data: a new one needs no code."""

    def test_keep_named_and_escapes(self) -> None:
        profile = Profile(
            "test",
            ranges=((0x00, 0x7F),),
            keep=frozenset("ab"),
            named={"c": "<c>"},
            escapes=((0x0F, "<{:x}>"), (0x10FFFF, "<{:04x}>")),
            limit=4,
            more="+{size}",
        )
        self.assertEqual(sanitise("abc\x01", profile), "ab<c><1>")
        self.assertEqual(sanitise("ab\x7f", profile), "ab<007f>")
        self.assertEqual(sanitise("abcde", profile), "ab<c><0064>+5")
        self.assertEqual(sanitise("\u00e9", profile), "\u00e9")
