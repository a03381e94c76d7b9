"""
The one sanitiser: untrusted text made safe for where it goes.  Each
destination is a named L{Profile}, and profiles differ only in data: which
characters are unsafe, what each becomes, what is cut.  L{sanitise} applies
one; the daemons and the client both use it, with no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

__all__ = [
    "JSON",
    "LISTING",
    "LOG",
    "PYTHON_ESCAPES",
    "REPLY",
    "TERMINAL",
    "TERMINAL_RANGES",
    "Profile",
    "sanitise",
]

_LAST = 0x10FFFF

#: code points that never reach another terminal or the log raw: C0
#: controls, DEL, C1 controls; every format character (Unicode category Cf:
#: bidi marks, embeddings, overrides and isolates, zero-width space, word
#: joiner, BOM, soft hyphen, tags...) except the zero-width non-joiner and
#: joiner, which emoji sequences and several scripts need; the line and
#: paragraph separators (Zl, Zp); and the other characters that render as
#: nothing (combining grapheme joiner, Hangul fillers, Khmer inherent
#: vowels), with the unassigned code points reserved for more of them.
#: Variation selectors stay: they only pick the glyph of the character
#: before them.  A fixed table, so every Python shows a message alike.
TERMINAL_RANGES = (
    (0x00, 0x09),
    (0x0B, 0x1F),
    (0x7F, 0x9F),
    (0xAD, 0xAD),
    (0x034F, 0x034F),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180E, 0x180E),
    (0x200B, 0x200B),
    (0x200E, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE00FF),
    (0xE01F0, 0xE0FFF),
)

#: Python's own escapes (as C{repr} writes a character): C{\\xNN},
#: C{\\uNNNN}, C{\\UNNNNNNNN}
PYTHON_ESCAPES = ((0xFF, "\\x{:02x}"), (0xFFFF, "\\u{:04x}"), (_LAST, "\\U{:08x}"))

_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _character_class(
    codes: list[tuple[int, int]], low: int, high: int
) -> re.Pattern[str] | None:
    """A regex for the code points of C{codes} from C{low} to C{high}, if any."""
    parts = [
        f"\\U{max(a, low):08x}-\\U{min(b, high):08x}"
        for a, b in codes
        if a <= high and b >= low
    ]
    return re.compile("[" + "".join(parts) + "]") if parts else None


def _utf8(text: str) -> bytes:
    """C{text} as UTF-8, undecodable bytes (surrogate escapes) as they came."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # Some other lone surrogate: its own three bytes, never an error.
        return text.encode("utf-8", "surrogatepass")


class _ByCategory(dict[int, str]):
    """A translation table that decides the code points it lacks by category."""

    def __init__(self, fixed: dict[int, str], profile: Profile) -> None:
        super().__init__(fixed)
        self.profile = profile

    def __missing__(self, code: int) -> str:
        profile = self.profile
        c = chr(code)
        if c in profile.keep or unicodedata.category(c) not in profile.categories:
            raise LookupError(code)  # str.translate keeps the character
        return profile.escape(code)


@dataclass(frozen=True)
class Profile:
    """
    How one destination shows untrusted text: which characters are unsafe,
    what each becomes, and how much of it is shown.
    """

    name: str
    #: code point ranges (inclusive) never shown raw
    ranges: tuple[tuple[int, int], ...] = ()
    #: Unicode general categories never shown raw, as this Python knows them
    categories: frozenset[str] = frozenset()
    #: characters shown raw whatever C{ranges} and C{categories} say
    keep: frozenset[str] = frozenset()
    #: characters with a replacement of their own, unsafe or not
    named: Mapping[str, str] = field(default_factory=dict)
    #: what any other unsafe code point becomes: the first format whose
    #: bound is at least the code point, given it (C{"\\x{:02x}"})
    escapes: tuple[tuple[int, str], ...] = ((_LAST, "\ufffd"),)
    #: sequences replaced before anything else (a CR LF by a LF)
    before: tuple[tuple[str, str], ...] = ()
    #: what is shown and counted: characters (C{text}), or the UTF-8 bytes
    #: of the text, undecodable bytes as they came (C{utf-8}: each unsafe
    #: byte is escaped, never a code point)
    units: Literal["text", "utf-8"] = "text"
    #: how bytes given to a C{text} profile are decoded (an error handler)
    undecodable: str = "replace"
    #: the longest input shown, in units, unless a call says; None: all
    limit: int | None = None
    #: appended to input cut at the limit; C{{size}} is its whole size
    more: str = ""

    def escape(self, code: int) -> str:
        """What the unsafe code point C{code} becomes."""
        for bound, form in self.escapes:
            if code <= bound:
                return form.format(code)
        return self.escapes[-1][1].format(code)

    @cached_property
    def _unsafe(self) -> list[tuple[int, int]]:
        # The ranges less the kept characters, with the named ones.
        kept = sorted(ord(c) for c in self.keep)
        codes = sorted({(ord(c), ord(c)) for c in self.named})
        for low, high in self.ranges:
            for k in kept:
                if low <= k <= high:
                    if low < k:
                        codes.append((low, k - 1))
                    low = k + 1
            if low <= high:
                codes.append((low, high))
        return sorted(codes)

    @cached_property
    def _table(self) -> dict[int, str]:
        table = {c: self.escape(c) for a, b in self._unsafe for c in range(a, b + 1)}
        table.update((ord(c), text) for c, text in self.named.items())
        return _ByCategory(table, self) if self.categories else table

    @cached_property
    def _ascii(self) -> re.Pattern[str] | None:
        if not self.categories:
            return _character_class(self._unsafe, 0, 0x7F)
        by_category = [
            (c, c)
            for c in range(0x80)
            if chr(c) not in self.keep
            and unicodedata.category(chr(c)) in self.categories
        ]
        return _character_class(sorted(self._unsafe + by_category), 0, 0x7F)

    @cached_property
    def _bmp(self) -> re.Pattern[str] | None:
        return _character_class(self._unsafe, 0, 0xFFFF)

    @cached_property
    def _astral(self) -> re.Pattern[str] | None:
        return _character_class(self._unsafe, 0x10000, _LAST)

    @cached_property
    def apply(self) -> Callable[[bytes | str, int | None], str]:
        """L{sanitise} for this profile, its data bound once (a hot path)."""
        ascii_, bmp, astral = self._ascii, self._bmp, self._astral
        by_category, table, before = bool(self.categories), self._table, self.before
        as_bytes, undecodable = self.units == "utf-8", self.undecodable
        default, more = self.limit, self.more
        astral_search = _ASTRAL.search

        def apply(data: bytes | str, limit: int | None) -> str:
            if as_bytes:
                if isinstance(data, str):
                    data = _utf8(data)
                # One character per byte, so each is escaped on its own.
                text = data.decode("latin-1")
            elif isinstance(data, bytes):
                text = data.decode("utf-8", undecodable)
            else:
                text = data
            if limit is None:
                limit = default
            cut = ""
            if limit is not None and len(text) > limit:
                cut = more.format(size=len(text))
                text = text[:limit]
            for old, new in before:
                if old in text:
                    text = text.replace(old, new)
            # Searched in steps, as one regex over every range is slower on
            # typical text (docs/performance.md, "The sanitiser"): ASCII
            # text for its few ranges only; other text for those of the BMP
            # (a bitmap), and past the BMP only if needed.  A profile by
            # category looks at each character.
            if text.isascii():
                unsafe = ascii_ is not None and ascii_.search(text) is not None
            elif by_category or (bmp is not None and bmp.search(text) is not None):
                unsafe = True
            else:
                unsafe = (
                    astral is not None
                    and astral_search(text) is not None
                    and astral.search(text) is not None
                )
            if unsafe:
                text = text.translate(table)
            return text + cut if cut else text

        return apply


def sanitise(data: bytes | str, profile: Profile, limit: int | None = None) -> str:
    """
    C{data} as C{profile} shows it: cut at C{limit} units (the profile's
    own limit if None), unsafe characters replaced, and marked if cut.
    """
    return profile.apply(data, limit)


#: text for another member's terminal (the chat): line endings become
#: C{\\n}, a tab a space, every other character of L{TERMINAL_RANGES} U+FFFD
TERMINAL = Profile(
    "terminal",
    ranges=TERMINAL_RANGES,
    named={"\t": " "},
    before=(("\r\n", "\n"),),
)

#: a log line: printable ASCII stays, every other byte (CR, LF, ESC, other
#: controls, non-ASCII, invalid UTF-8) is an escape; 200 bytes at most
LOG = Profile(
    "log",
    ranges=((0x00, 0x1F), (0x7F, 0xFF)),
    named={"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"},
    escapes=((0xFF, "\\x{:02x}"),),
    units="utf-8",
    limit=200,
    more="...({size} bytes)",
)

#: a name from a server or the user, printed by the client: controls,
#: format characters (bidi, zero-width), surrogates (undecodable bytes) and
#: line separators become C{\\xNN} or C{\\uNNNN}, a backslash two
LISTING = Profile(
    "listing",
    categories=frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"}),
    named={"\\": "\\\\"},
    escapes=((0xFF, "\\x{:02x}"), (_LAST, "\\u{:04x}")),
    undecodable="backslashreplace",
)

#: a server's words quoted by the client: what C{str.isprintable} refuses
#: (controls, format, private-use, unassigned, every separator but the
#: space) is written as Python writes it; 300 characters at most
REPLY = Profile(
    "reply",
    categories=frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}),
    keep=frozenset({" "}),
    named={"\t": "\\t", "\n": "\\n", "\r": "\\r"},
    escapes=PYTHON_ESCAPES,
    limit=300,
)

#: a string in a JSON log line: JSON cannot carry lone surrogates
#: (undecodable bytes), so they are escaped; all else stays
JSON = Profile("json", ranges=((0xD800, 0xDFFF),), escapes=PYTHON_ESCAPES)
