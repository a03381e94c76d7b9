"""
Property-based fuzzing of the chat relay: a hypothesis state machine drives
L{sockd.chat.protocol.ChatProtocol} and its L{sockd.chat.state.ChatState}
with datagrams from validated and spoofed addresses, commands, arbitrary
text and bytes, clock advances, reloads and failing sends, and checks the
relay's invariants after every step.
"""

from __future__ import annotations

import errno
import os
import re
import unicodedata
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sockd.chat.protocol import ChatProtocol
from sockd.chat.state import AMPLIFICATION, ChatState
from sockd.chat.text import parse_event
from sockd.core.config import ChatSettings
from sockd.core.limits import peer_key
from tests.helpers import FakeDatagramTransport
from tests.helpers import settings as parse_settings

MAX_MESSAGE = 64
#: clients that read what they get, so they can return the cookie
HONEST = [("127.0.0.1", 40001 + i) for i in range(5)]
#: one more host, written both ways: it counts as one client address
HONEST += [("127.0.0.6", 40010), ("::ffff:127.0.0.6", 40011)]
#: sources that never see their replies: spoofed, or small services
SPOOFED = [("127.0.0.2", 50001), ("127.0.0.3", 50002), ("127.0.0.4", 7)]
SPOOFED += [("127.0.0.4", 0), ("127.0.0.5", 53)]
TOKEN = re.compile(rb"(?:/v |@v=)([a-z2-7]{8})\b")

#: what the server may send to an address that is not a member: a welcome
#: with a cookie (and its machine line), or an error about the datagram;
#: never room traffic
STRANGER_REPLY = re.compile(
    r"\*\*\* ((welcome to sockd chat[.;] |you are not in the chat yet\. )"
    r".*/v [a-z2-7]{8}.*\n\*\*\* @v=[a-z2-7]{8}"
    r"|(to join|not joined yet; to join|that join code is wrong or expired"
    r"|wrong or expired code)[,;] send: /v [a-z2-7]{8}\n\*\*\* @v=[a-z2-7]{8}"
    r"|@v=[a-z2-7]{8}"
    r"|error: message longer than \d+ bytes"
    r"|error: message is not valid UTF-8"
    r"|error: the chat is full; try later"
    r"|error: too many members from your address( \(at most \d+\); try later)?)\n"
)
#: the machine lines the server writes (docs/protocol-chat.md)
EVENTS = frozenset({"v", "welcome", "member", "nick", "room", "dropped", "taken"})
#: how every line a member causes starts
MEMBER_TEXT = ("<", "* ", "[msg] <", "[msg -> ")
#: characters that render as nothing although they are not format
#: characters (the rule in docs/protocol-chat.md, "Terminal safety")
BLANK = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0")


def unsafe(text: str, newline: bool = False) -> str | None:
    """
    The first character of C{text} that must not reach a terminal: a
    control (but newline, unless C{newline}), a format character (but the
    zero-width joiner and non-joiner), a line or paragraph separator, or a
    blank filler.
    """
    for c in text:
        if c.isascii() and c.isprintable():
            continue
        if c == "\n" and not newline:
            continue
        if c in "\u200c\u200d":
            continue
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") or c in BLANK:
            return c
    return None


CONFIGS = [
    # small caps, so the limits are reached within a few steps
    {"max_members": "3", "max_rooms": "3", "max_room_members": "2"},
    {"max_members": "4", "history": "2", "rate": "1000", "burst": "1000"},
    # a tight output budget: fan-outs and replies get dropped
    {"total_output_rate": "5", "max_room_members": "3", "burst": "3"},
    # trusted networks: every address joins at once
    {"validation": "false", "max_members": "3", "nick_max_length": "4"},
    # two members per host: the ports of 127.0.0.1 compete
    {"max_members_per_ip": "2", "rate": "1000", "burst": "1000"},
]

BASE = {"max_message": str(MAX_MESSAGE), "idle_timeout": "30"}
#: only on reload: another default room, shorter history and names
RELOADS = [
    {"default_room": "hall", "history": "1", "nick_max_length": "3"},
    {"default_room": "Dev", "max_members": "1", "max_room_members": "1"},
]
NICK_SYNTAX = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
NASTY = st.sampled_from(
    [
        *("\x1b[2J", "\u202e", "\u2066", "\u2069", "\x9b", "\r", "\x00", "\x7f"),
        *("\t", "\u200f", "\r\n", "\n", "\x85", "\ufeff", "\U0001f600", "\u0390"),
        *("\u2028", "\u2029", "\u200b", "\u200e", "\u061c", "\u2060", "\u180e"),
        *("\u3164", "\u115f", "\uffa0", "\u00ad", "\U000e0041", "\u200d", "\ufe0f"),
    ]
)
TEXT = st.lists(st.one_of(st.text(max_size=12), NASTY), max_size=4).map("".join)
NICK = st.one_of(
    st.sampled_from(["ann", "Ann", "ANN", "bob", "bo", "carol", "x", "z-_9"])
    | st.sampled_from(["guest-1", "Guest7", "admin", "ROOT", "me", "1abc"])
    | st.sampled_from(["a" * 17, "dé", "a b", "*x", "<x>", ""]),
    st.text(max_size=6),
)
ROOM = st.one_of(
    st.sampled_from(["lobby", "#lobby", "LOBBY", "dev", "#Dev", "ops", "q"])
    | st.sampled_from(["r1", "r2", "r3", "", "#", "a b", "x" * 33, "##x", "ü"]),
    st.text(max_size=6),
)
WORD = st.sampled_from(["nick", "NICK", "Join", "msg", "ME", "Who", "v", "hello"])
COMMAND = st.one_of(
    st.builds("/nick {}".format, NICK),
    st.builds("/join {}".format, ROOM),
    st.builds("/msg {} {}".format, NICK, TEXT),
    st.builds("/me {}".format, TEXT),
    st.builds("/topic {}".format, TEXT),
    st.sampled_from(["/part", "/who", "/rooms", "/topic", "/ping", "/quit"])
    | st.sampled_from(["/help", "/hello", "/v", "/v abcdefgh", "/", "/me", "/msg"])
    | st.sampled_from(["/msg ann", "//not a command", "*** welcome", "/PING"]),
    st.builds("/{} {}".format, st.one_of(WORD, st.text(max_size=8)), TEXT),
    # cookie-sized arguments: a stranger's /v is checked against the HMAC
    st.builds("/v {}".format, st.text(min_size=7, max_size=9)),
)
LINES = st.lists(st.one_of(COMMAND, TEXT), min_size=1, max_size=3)
ENDING = st.sampled_from(["", "\n", "\r\n", "\n\n", "\r"])
TEXT_DATAGRAM = st.builds(
    lambda lines, end: ("\n".join(lines) + end).encode(), LINES, ENDING
)
AROUND_CAP = st.builds(
    lambda n, fill, end: (fill * n)[:n] + end,
    st.integers(MAX_MESSAGE - 3, MAX_MESSAGE + 4),
    st.sampled_from([b"x", "\u00e9".encode(), "\U0001f600".encode(), b"\xff"]),
    st.sampled_from([b"", b"\n", b"\r\n", b"\r\n\r\n"]),
)
DATAGRAM = st.one_of(TEXT_DATAGRAM, st.binary(max_size=80), AROUND_CAP)


class RecordingTransport(FakeDatagramTransport):
    """Records each datagram with whether its address was a member then."""

    def __init__(self, state: ChatState) -> None:
        super().__init__()
        self.state = state
        self.log: list[tuple[bytes, Any, bool]] = []
        #: addresses whose sendto fails, and how
        self.failing: dict[Any, int] = {}

    def write(self, data: bytes, addr: Any = None) -> None:
        if addr in self.failing:
            raise OSError(self.failing[addr], os.strerror(self.failing[addr]))
        super().write(data, addr)
        self.log.append((data, addr, addr in self.state.members))


class ChatMachine(RuleBasedStateMachine):
    """Several clients, honest and spoofed, against one relay."""

    def __init__(self) -> None:
        super().__init__()
        self.state: ChatState | None = None
        self.received: dict[Any, int] = {}
        self.sent: dict[Any, int] = {}
        #: addresses that returned a good cookie or were members at some
        #: point: they proved that they receive
        self.validated: set[Any] = set()
        self.checked = 0
        self.problems: list[str] = []
        self.caps: dict[str, int] = {}
        self.defaults: set[str] = set()
        #: validation was off at some point: any address may be a member
        self.trusting = False
        globalLogPublisher.addObserver(self.observe)

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self.observe)

    def observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") != "sockd.chat":
            return
        if "log_failure" in event:
            self.problems.append(f"failure logged: {event['log_failure']}")
        text = formatEvent(event)
        if unsafe(text, newline=True):
            self.problems.append(f"unsafe log line: {text!r}")

    @initialize(config=st.sampled_from(CONFIGS))
    def start(self, config: dict[str, str]) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        chat = parse_settings(chat={**BASE, **config}).chat
        self.state = ChatState(chat, self.clock, key=b"fuzz" * 8)
        self.protocol = ChatProtocol(self.state)
        self.transport = RecordingTransport(self.state)
        self.protocol.makeConnection(self.transport)  # type: ignore[arg-type]
        self.applied(chat)

    def applied(self, chat: ChatSettings) -> None:
        """Remember what was in force: members and rooms may outlive a
        reload that lowers a cap, and a former default room its members."""
        self.settings = chat
        for key in (
            "max_members",
            "max_members_per_ip",
            "max_rooms",
            "max_room_members",
            "nick_max_length",
        ):
            self.caps[key] = max(self.caps.get(key, 0), getattr(chat, key))
        self.defaults.add(chat.default_room.lower())
        self.trusting = self.trusting or not chat.validation

    def deliver(self, data: bytes, addr: Any) -> None:
        self.received[addr] = self.received.get(addr, 0) + len(data)
        self.protocol.datagramReceived(data, addr)

    # --- rules ------------------------------------------------------------

    @rule(addr=st.sampled_from(HONEST + SPOOFED), data=DATAGRAM)
    def datagram(self, addr: Any, data: bytes) -> None:
        self.deliver(data, addr)

    @rule(addr=st.sampled_from(HONEST), lines=st.lists(COMMAND, min_size=1, max_size=2))
    def command(self, addr: Any, lines: list[str]) -> None:
        self.deliver("\n".join(lines).encode() + b"\n", addr)

    @rule(
        addr=st.sampled_from(HONEST),
        nick=st.sampled_from(["ann", "Ann", "bob", "BOB", "carol", "dave"]),
        room=st.sampled_from(["lobby", "dev", "#DEV", "ops", "qa"]),
    )
    def settle(self, addr: Any, nick: str, room: str) -> None:
        """The usual first steps: a name, a room, a look around."""
        self.deliver(f"/nick {nick}\n/join {room}\n/who".encode(), addr)

    @rule(addr=st.sampled_from(HONEST), text=TEXT)
    def chatter(self, addr: Any, text: str) -> None:
        self.deliver(text.encode(), addr)

    @rule(
        addr=st.sampled_from(HONEST),
        upper=st.booleans(),
        then=st.lists(COMMAND, max_size=2),
    )
    def validate(self, addr: Any, upper: bool, then: list[str]) -> None:
        """An honest client returns the last cookie it was sent."""
        token = self.last_token(addr)
        if token is None:
            self.deliver(b"hello there, anybody home?\n", addr)
            token = self.last_token(addr)
            if token is None:
                return  # rate-limited, or the chat is full
        assert self.state is not None
        if self.state.check_token(addr, token.decode()):
            # It proved that it receives, whether or not it gets in.
            self.validated.add(addr)
        token = token.upper() if upper else token
        self.deliver(b"\n".join([b"/v " + token, *(c.encode() for c in then)]), addr)

    def last_token(self, addr: Any) -> bytes | None:
        for data, to, _ in reversed(self.transport.log):
            found = TOKEN.search(data) if to == addr else None
            if found is not None:
                return found.group(1)
        return None

    @rule(
        addr=st.sampled_from(HONEST),
        error=st.sampled_from([None, errno.ENOBUFS, errno.EAGAIN, errno.EHOSTUNREACH]),
    )
    def sendto_fails(self, addr: Any, error: int | None) -> None:
        """The kernel refuses datagrams to one address (or stops refusing)."""
        if error is None:
            self.transport.failing.pop(addr, None)
        else:
            self.transport.failing[addr] = error

    @rule(config=st.sampled_from(CONFIGS + RELOADS))
    def reload(self, config: dict[str, str]) -> None:
        """SIGHUP: new limits, rules and default room at once."""
        settings = parse_settings(chat={**BASE, **config})
        self.protocol.reconfigure(settings)
        self.applied(settings.chat)

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3, 1.0, 5.0, 31.0, 125.0, 400.0]))
    def advance(self, seconds: float) -> None:
        assert self.state is not None
        self.clock.advance(seconds)
        self.state.expire()

    # --- invariants ---------------------------------------------------------

    @invariant()
    def nothing_logged_badly(self) -> None:
        assert not self.problems, self.problems

    @invariant()
    def names_and_rooms_consistent(self) -> None:
        state = self.state
        if state is None:
            return
        self.validated.update(state.members)
        assert len(state.members) <= self.caps["max_members"]
        # Members per client address: counted right, and within the cap.
        hosts = Counter(peer_key(addr[0]) for addr in state.members)
        assert state.peers == hosts, (state.peers, hosts)
        assert max(hosts.values(), default=0) <= self.caps["max_members_per_ip"]
        assert len(state.rooms) <= self.caps["max_rooms"]
        # Nicknames: one table entry per member, unique ignoring case.
        assert len(state.nicks) == len(state.members)
        for key, member in state.nicks.items():
            assert state.members.get(member.addr) is member
            assert key == member.nick.lower() == member.key
            if not member.nick.startswith("guest-"):
                assert NICK_SYNTAX.fullmatch(member.nick), member.nick
                assert len(member.nick) <= self.caps["nick_max_length"]
                assert not member.nick.lower().startswith("guest")
        assert len({m.nick.lower() for m in state.members.values()}) == len(
            state.members
        )
        # Rooms: each member in at most one, and the rooms agree.
        assert state.default_room.lower() in state.rooms
        seen: set[Any] = set()
        for key, room in state.rooms.items():
            assert key == room.name.lower()
            assert len(room.members) <= self.caps["max_room_members"]
            assert room.history.maxlen == self.settings.history
            assert room.members or key in self.defaults
            for addr, member in room.members.items():
                assert state.members.get(addr) is member
                assert member.room is room
                assert addr not in seen
                seen.add(addr)
        for addr, member in state.members.items():
            assert member.addr == addr
            assert (member.room is None) == (addr not in seen)
            if member.room is not None:
                assert state.rooms[member.room.name.lower()] is member.room
        if not self.trusting:
            # A spoofed source never becomes a member.
            assert not set(state.members) & set(SPOOFED)

    @invariant()
    def output_safe_and_bounded(self) -> None:
        if self.state is None:
            return
        log = self.transport.log
        for data, addr, member in log[self.checked :]:
            text = data.decode("utf-8")  # raises if not valid UTF-8
            assert text.endswith("\n"), data
            assert "\r" not in text, data
            assert unsafe(text) is None, data
            assert len(data) <= 1500, len(data)
            if member:
                self.validated.add(addr)
            else:
                # Never room traffic, /who or history to a non-member.
                assert STRANGER_REPLY.fullmatch(text), (addr, data)
            # Machine lines: only the server's, each at the end of a notice.
            lines = text[:-1].split("\n")
            events = [parse_event(line) for line in lines]
            if lines[0].startswith(MEMBER_TEXT):
                assert events == [None], data  # one line, whatever was said
            assert all(event is None for event in events[:-1]), data
            if events[-1] is not None:
                assert events[-1].name in EVENTS, data
                if events[-1].name == "v":
                    assert events[-1].value == self.state.token(addr), data
            self.sent[addr] = self.sent.get(addr, 0) + len(data)
        self.checked = len(log)
        for addr, count in self.sent.items():
            if addr not in self.validated:
                assert count <= AMPLIFICATION * self.received.get(addr, 0), addr
        for addr in SPOOFED:
            if addr[1] in (0, 7, 53):
                assert addr not in self.sent, addr


ChatMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestChatMachine = ChatMachine.TestCase


class DatagramFuzzTests(SynchronousTestCase):
    """Whatever arrives, the protocol answers safely and never raises."""

    @given(
        datagrams=st.lists(
            st.tuples(
                st.sampled_from(HONEST[:2] + SPOOFED[:2]),
                st.one_of(
                    st.binary(max_size=64),
                    st.integers(1020, 1030).flatmap(
                        lambda n: st.binary(min_size=n, max_size=n)
                    ),
                    st.text(max_size=30).map(str.encode),
                ),
            ),
            max_size=12,
        ),
        validation=st.booleans(),
    )
    @settings(max_examples=300, deadline=None)
    def test_arbitrary_datagrams(
        self, datagrams: list[tuple[Any, bytes]], validation: bool
    ) -> None:
        clock = Clock()
        clock.advance(1000)
        chat = parse_settings(chat={"validation": str(validation).lower()}).chat
        state = ChatState(chat, clock, key=b"k" * 32)
        protocol = ChatProtocol(state)
        transport = FakeDatagramTransport()
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        received: dict[Any, int] = {}
        for addr, data in datagrams:
            received[addr] = received.get(addr, 0) + len(data)
            protocol.datagramReceived(data, addr)
        for data, _ in transport.written:
            text = data.decode("utf-8")
            self.assertIsNone(unsafe(text), data)
            self.assertNotIn("\r", text)
        if validation:
            for addr, count in received.items():
                sent = sum(len(d) for d, a in transport.written if a == addr)
                self.assertLessEqual(sent, AMPLIFICATION * count)
                self.assertNotIn(addr, state.members)

    def test_non_ascii_cookie_is_refused_not_raised(self) -> None:
        """Found by the state machine: an 8-character non-ASCII cookie made
        hmac.compare_digest raise TypeError out of datagramReceived."""
        clock = Clock()
        state = ChatState(parse_settings().chat, clock, key=b"k" * 32)
        protocol = ChatProtocol(state)
        transport = FakeDatagramTransport()
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        for cookie in ["0000000\u00e9", "\U0001f600" * 8, "abcdefg\x80"]:
            protocol.datagramReceived(f"/v {cookie}\n".encode(), HONEST[0])
        self.assertNotIn(HONEST[0], state.members)
        (welcome, *_) = [d for d, a in transport.written if a == HONEST[0]]
        self.assertRegex(welcome, TOKEN)

    def test_default_room_with_capitals(self) -> None:
        """Found by the state machine: a default room written with capitals
        (in the file, or by a reload) made every admission raise KeyError."""
        clock = Clock()
        config = parse_settings(chat={"default_room": "Lobby", "validation": "false"})
        state = ChatState(config.chat, clock, key=b"k" * 32)
        protocol = ChatProtocol(state)
        transport = FakeDatagramTransport()
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        protocol.datagramReceived(b"hello\n", HONEST[0])
        member = state.members[HONEST[0]]
        assert member.room is not None
        self.assertEqual(member.room.name, "Lobby")
        reload = parse_settings(chat={"default_room": "#Dev", "validation": "false"})
        protocol.reconfigure(reload)
        protocol.datagramReceived(b"hello\n", HONEST[1])
        member = state.members[HONEST[1]]
        assert member.room is not None
        self.assertEqual(member.room.name, "Dev")
