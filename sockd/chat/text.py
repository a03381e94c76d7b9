"""
The chat's text rules, with no I/O, shared by the relay and the C{sockd
chat} client: the terminal-safety filter (L{clean}, the core's sanitiser
with its C{terminal} profile), the syntax of nicknames and room names,
the helpers that keep replies short, and the machine lines
(L{event_line}, L{parse_event}) that tell a client program what a notice
means without parsing its prose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sockd.core.text import TERMINAL, TERMINAL_RANGES, sanitise

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

#: what L{clean} replaces (the core's table)
UNSAFE_RANGES = TERMINAL_RANGES

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
    Make untrusted text safe for a terminal (the core's L{TERMINAL}
    profile): line endings become C{\\n}, a tab a space, and every other
    control (C0, DEL, C1, bare CR), format character, line separator or
    invisible filler (L{UNSAFE_RANGES}) U+FFFD.  Other valid text is kept.
    """
    return sanitise(text, TERMINAL)


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
