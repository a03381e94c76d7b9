"""
The chat's text rules, with no I/O, shared by the relay and the C{sockd
chat} client: the terminal-safety filter (L{clean}), the syntax of
nicknames and room names, the helpers that keep replies short, and the
machine lines (L{event_line}, L{parse_event}) that tell a client program
what a notice means without parsing its prose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "BYE",
    "EVENT_LIMIT",
    "EVENT_PREFIX",
    "LIST_LIMIT",
    "NICK",
    "PONG",
    "RESERVED",
    "ROOM",
    "UNSAFE_RANGES",
    "Event",
    "clean",
    "clip",
    "event_line",
    "listing",
    "nick_problem",
    "parse_event",
    "room_name",
]

#: code points that never reach another terminal or the log raw (each
#: becomes U+FFFD, a tab a space): C0 controls but newline, DEL, C1
#: controls; every format character (Unicode category Cf: bidi marks,
#: embeddings, overrides and isolates, zero-width space, word joiner, BOM,
#: soft hyphen, tags...) except the zero-width non-joiner and joiner, which
#: emoji sequences and several scripts need; the line and paragraph
#: separators (Zl, Zp); and the other characters that render as nothing
#: (combining grapheme joiner, Hangul fillers, Khmer inherent vowels), with
#: the unassigned code points reserved for more of them.  Variation
#: selectors stay: they only pick the glyph of the character before them.
UNSAFE_RANGES = (
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


def _character_class(low: int, high: int) -> re.Pattern[str]:
    """A regex for the code points of L{UNSAFE_RANGES} from C{low} to C{high}."""
    parts = [
        f"\\U{max(a, low):08x}-\\U{min(b, high):08x}"
        for a, b in UNSAFE_RANGES
        if a <= high and b >= low
    ]
    return re.compile("[" + "".join(parts) + "]")


# Searched in steps, as a regex over every range is three times slower on
# typical text: ASCII text (the usual case) for its few ranges only; other
# text for those of the BMP (a bitmap), and past the BMP only if needed.
_UNSAFE_ASCII = _character_class(0, 0x7F)
_UNSAFE_BMP = _character_class(0, 0xFFFF)
_UNSAFE_ASTRAL = _character_class(0x10000, 0x10FFFF)
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_SAFE_TABLE = {c: "\ufffd" for a, b in UNSAFE_RANGES for c in range(a, b + 1)}
_SAFE_TABLE[0x09] = " "

#: a nickname (its length is a setting)
NICK = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
#: a room name, with an optional leading C{#}; group 1 is the name
ROOM = re.compile(r"#?([A-Za-z0-9_-]{1,32})")
#: nicknames nobody may take (any case), besides those starting with C{guest}
RESERVED = frozenset(
    {"server", "sockd", "admin", "root", "system", "operator", "nickserv"}
    | {"chanserv", "you", "me", "nobody", "all", "everyone"}
)

#: longest reply built from a list (/who, /rooms), in bytes
LIST_LIMIT = 1200

#: the replies to C{/ping} and C{/quit}, without their newline
PONG = "*** pong"
BYE = "*** bye"

#: what starts a machine line; no line a member causes can start so (see
#: docs/protocol-chat.md, "Machine lines")
EVENT_PREFIX = "*** @"
#: longest machine line read, in characters
EVENT_LIMIT = 256
_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VALUE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def clean(text: str) -> str:
    """
    Make untrusted text safe for a terminal: line endings become C{\\n},
    a tab a space, and every other control (C0, DEL, C1, bare CR), format
    character, line separator or invisible filler (L{UNSAFE_RANGES}) U+FFFD.
    Other valid text is kept as it is.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\ufffd")
    if text.isascii():
        if _UNSAFE_ASCII.search(text) is None:
            return text
    elif _UNSAFE_BMP.search(text) is None and (
        _ASTRAL.search(text) is None or _UNSAFE_ASTRAL.search(text) is None
    ):
        return text
    return text.translate(_SAFE_TABLE)


def nick_problem(nick: str, limit: int) -> str | None:
    """Why C{nick} cannot be taken (at most C{limit} characters), or None."""
    if not nick or len(nick) > limit or not NICK.fullmatch(nick):
        # Only the member's own words are clipped, never the rule.
        said = f"{clip(nick, 32)} is no nickname: " if nick else "usage: /nick NAME; "
        return (
            f"{said}a nickname is 1 to {limit} letters, digits, '_' or '-', "
            "starting with a letter"
        )
    lowered = nick.lower()
    if lowered in RESERVED or lowered.startswith("guest"):
        return f"{nick} is reserved"
    return None


def room_name(text: str) -> str | None:
    """The room C{text} names (C{#} optional), or None if it is no room name."""
    match = ROOM.fullmatch(text)
    return match.group(1) if match is not None else None


def clip(text: str, limit: int = 64) -> str:
    """
    C{text}, cut to C{limit} characters and marked so if longer: for the
    words a member sent, quoted in a reply (never for the reply's own text).
    """
    return text if len(text) <= limit else text[:limit] + "..."


def listing(head: str, items: list[str]) -> str:
    """C{head} and the items, comma-separated, within L{LIST_LIMIT} bytes."""
    out = head
    for i, item in enumerate(items):
        piece = item if i == 0 else ", " + item
        if len(out.encode()) + len(piece.encode()) > LIST_LIMIT:
            return out + f" ... and {len(items) - i} more\n"
        out += piece
    return out + "\n"


@dataclass(frozen=True)
class Event:
    """
    What a machine line says: the event's C{name}, its own C{value} (empty
    if none) and the other fields.
    """

    name: str
    value: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)


def _field_text(key: str, value: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"machine line: bad field name {key!r}")
    if not value:
        return key
    if not _VALUE.fullmatch(value):
        raise ValueError(f"machine line: bad value {value!r} for {key}")
    return f"{key}={value}"


def event_line(name: str, value: str = "", /, **fields: str | None) -> str:
    """
    The machine line for event C{name}, newline included:
    C{*** @NAME[=VALUE][ KEY=VALUE]...}, fields that are None left out.
    Raises L{ValueError} for a name or value outside that syntax.
    """
    if name in fields:
        raise ValueError(f"machine line: {name} given twice")
    parts = [_field_text(name, value)]
    parts += [_field_text(key, v) for key, v in fields.items() if v is not None]
    line = EVENT_PREFIX + " ".join(parts)
    if len(line) > EVENT_LIMIT:
        raise ValueError(f"machine line: longer than {EVENT_LIMIT} characters")
    return line + "\n"


def parse_event(line: str) -> Event | None:
    """
    The L{Event} in C{line} (one line, without its newline), or None if
    C{line} is not exactly a machine line.
    """
    if not line.startswith(EVENT_PREFIX) or len(line) > EVENT_LIMIT:
        return None
    found: dict[str, str] = {}
    for text in line[len(EVENT_PREFIX) :].split(" "):
        key, equals, value = text.partition("=")
        if not _KEY.fullmatch(key) or key in found:
            return None
        if equals and not _VALUE.fullmatch(value):
            return None
        found[key] = value
    name = next(iter(found))
    value = found.pop(name)
    return Event(name, value, found)
