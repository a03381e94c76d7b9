"""
UDP chat relay: one message per datagram, UTF-8 text, a client is its
source address.  The wire protocol is in C{docs/protocol-chat.md}.

 - L{ChatState} decides everything (members, rooms, nicknames, presence,
   history, address validation, rate limits) and talks back through a
   L{Sender}; it does no I/O and reads time from the clock it is given.
 - L{ChatProtocol} parses datagrams (size, UTF-8, terminal safety) and
   sends what the state decides, counting C{sendto} errors.

Address validation follows the QUIC rule (RFC 9000, section 8.1): until an
address returns the cookie it was sent (an HMAC of address and epoch under a
per-process random key), it gets at most three times the bytes it sent, and
no room traffic at all.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import math
import os
import re
import socket
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Literal, Protocol

from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from sockd.core.config import ChatSettings, Config
from sockd.core.interfaces import IMetricsSource, IReconfigurable
from sockd.core.limits import LOOP_PORTS, RateLimiter, TokenBucket, peer_key
from sockd.core.logs import escape

__all__ = [
    "AMPLIFICATION",
    "Backend",
    "ChatProtocol",
    "ChatState",
    "FairShare",
    "LocalBackend",
    "Member",
    "Room",
    "Sender",
    "clean",
]

log = Logger(namespace="sockd.chat")

Address = Any  # (host, port) as recvfrom gives it

#: an unvalidated address gets at most this many times the bytes it sent
AMPLIFICATION = 3

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

_NICK = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_ROOM = re.compile(r"#?([A-Za-z0-9_-]{1,32})")
_RESERVED = frozenset(
    {"server", "sockd", "admin", "root", "system", "operator", "nickserv"}
    | {"chanserv", "you", "me", "nobody", "all", "everyone"}
)

#: cookies are good for the epoch they were made in and the next one
EPOCH = 120.0
TOKEN_LENGTH = 8

#: longest reply built from a list (/who, /rooms), in bytes
LIST_LIMIT = 1200

HELP = (
    "*** commands:\n"
    "***   TEXT            say TEXT to your room (//TEXT says /TEXT)\n"
    "***   /nick NAME      change your nickname\n"
    "***   /join ROOM      move to ROOM (created if needed)\n"
    "***   /part           leave your room\n"
    "***   /msg NICK TEXT  direct message\n"
    "***   /me ACTION      say an action\n"
    "***   /who            members of your room\n"
    "***   /rooms          list rooms\n"
    "***   /topic [TEXT]   show or set the room topic\n"
    "***   /ping           keep your place (silent members time out)\n"
    "***   /quit           leave the chat\n"
)


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


class Sender(Protocol):
    """Where the state's datagrams go."""

    def send(self, data: bytes, addr: Address) -> None: ...


class Backend:
    """
    What L{ChatState} tells other nodes and asks them, and how it names
    guests.  This one is the single-process chat: nothing to tell, nobody
    else to ask.  L{sockd.chat.federation} federates nodes over Redis.
    """

    #: True when there are other nodes (the hot path checks it once)
    federated = False

    def guest_name(self, number: int) -> str:
        return f"guest-{number}"

    def joined(self, member: Member) -> None:
        """C{member} was admitted (under a guest name)."""

    def entered(self, member: Member, room: Room, fresh: bool) -> None:
        """C{member} entered C{room}; C{fresh}: the room was just made here."""

    def left(self, member: Member, room: Room, how: str) -> None:
        """C{member} left C{room} (C{how}: left, quit, timed out from)."""

    def removed(self, member: Member) -> None:
        """C{member} is gone from this node."""

    def said(self, member: Member, room: Room, kind: str, text: str) -> None:
        """C{member} said (C{kind} C{say}) or did (C{me}) C{text} in C{room}."""

    def renamed(self, member: Member, old: str) -> None:
        """C{member}, formerly C{old}, has its new name."""

    def topic(self, member: Member, room: Room) -> None:
        """C{member} set C{room}'s topic."""

    def claim(self, member: Member, nick: str) -> bool:
        """
        Ask for C{nick} on C{member}'s behalf; True if this backend will
        answer later (through L{ChatState.claimed}), False to decide here.
        """
        return False

    def direct(self, member: Member, nick: str, text: str) -> str | None:
        """
        Deliver a direct message to C{nick}, not a member here: its
        canonical spelling, or None if no one has that name.
        """
        return None

    def who(self, room: str) -> list[str]:
        """Nicknames elsewhere in C{room} (lower-case name)."""
        return []

    def rooms(self) -> dict[str, tuple[str, int]]:
        """Rooms elsewhere: lower-case name -> (name, members there)."""
        return {}

    def metrics(self) -> list[tuple[str, str, dict[str, str], float]]:
        return []


LocalBackend = Backend


class Member:
    """A validated address in the chat."""

    __slots__ = (
        "addr",
        "key",
        "nick",
        "out",
        "peer",
        "room",
        "seen",
        "stamp",
        "throttled",
        "tokens",
    )

    def __init__(self, addr: Address, nick: str, out: Sender, now: float) -> None:
        self.addr = addr
        #: the client address it counts under (L{peer_key}: IPv4, IPv6 /64)
        self.peer = peer_key(addr[0])
        self.nick = nick
        self.key = nick.lower()
        self.out = out
        self.room: Room | None = None
        self.seen = now
        self.stamp = now
        self.tokens = 0.0
        self.throttled = False


class Room:
    """Members (by address), topic and recent messages of one room."""

    __slots__ = ("history", "members", "name", "topic")

    def __init__(self, name: str, history: int) -> None:
        self.name = name
        self.members: dict[Address, Member] = {}
        self.topic = ""
        self.history: deque[bytes] = deque(maxlen=history)


class FairShare:
    """
    The relay's output budget (one L{TokenBucket}, C{total}) shared between
    client addresses.  With N addresses sending in the last L{window}
    seconds, each has its own bucket of 1/(N+1) of the rate and burst (one
    share kept for a newcomer), never less than C{floor} tokens of burst
    (one fan-out to a full room).  Beyond its share an address gets only
    what leaves the budget at least C{reserve} tokens: so however many
    members one address has, an address within its share finds the budget
    there, and spare output still goes to whoever asks.
    """

    #: seconds an address counts as sending after it last asked
    window = 1.0

    def __init__(self, total: TokenBucket, floor: float, clock: IReactorTime) -> None:
        self.total = total
        self.clock = clock
        self.floor = floor
        #: address -> its bucket, the least recently used first
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        #: no bucket is forgotten before this time
        self._horizon = math.inf

    def _expire(self) -> None:
        """Forget the addresses that stopped sending."""
        buckets = self.buckets
        cutoff = self.clock.seconds() - self.window
        while buckets:
            oldest = next(iter(buckets.values()))
            if oldest.stamp > cutoff:
                self._horizon = oldest.stamp + self.window
                return
            buckets.popitem(last=False)
        self._horizon = math.inf

    @property
    def reserve(self) -> float:
        """What an address beyond its share must leave in the budget."""
        return max(self.total.burst / 2, min(self.floor, self.total.burst))

    def take(self, peer: str | None, cost: float) -> str | None:
        """
        Charge C{cost} datagrams to C{peer} (None: to no address); None if
        they may be sent, else why not: C{"share"} (the address is beyond
        its share and the budget is short) or C{"total"} (the budget is
        spent).
        """
        total = self.total
        if peer is None:
            return None if total.take(cost) else "total"
        buckets = self.buckets
        if self.clock.seconds() >= self._horizon:
            self._expire()
        bucket = buckets.get(peer)
        if bucket is None:
            # A newcomer: a full bucket of its share.
            share = len(buckets) + 2
            bucket = buckets[peer] = TokenBucket(
                total.rate / share, max(total.burst / share, self.floor), self.clock
            )
            self._horizon = min(self._horizon, bucket.stamp + self.window)
        else:
            buckets.move_to_end(peer)
            share = len(buckets) + 1
            bucket.rate = total.rate / share
            bucket.burst = max(total.burst / share, self.floor)
        if bucket.take(cost):
            if total.take(cost):
                return None
            bucket.tokens += cost  # not sent, not charged
            return "total"
        reserve = self.reserve
        if total.take(cost + reserve):
            total.tokens += reserve
            return None
        return "share"


class ChatState:
    """
    Everything the relay knows and decides.  L{receive} takes one decoded
    datagram (text, line endings included or not) with the byte count it
    arrived as; L{refuse} takes one that failed to decode; L{expire} drops
    silent members.  Replies go to each member's L{Sender}.
    """

    #: replies per second to unvalidated addresses, all of them together,
    #: so a spoofed flood cannot crowd out the members
    handshake_rate = 1000.0
    #: unvalidated addresses whose byte counts are remembered
    max_pending = 4096
    #: of which from one client address (ports of one IPv4 address, or
    #: addresses of one IPv6 /64), so one host cannot fill the table
    max_pending_per_ip = 64

    def __init__(
        self,
        settings: ChatSettings,
        clock: IReactorTime,
        key: bytes | None = None,
        own_ports: frozenset[int] = frozenset(),
        backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.backend = backend if backend is not None else Backend()
        self._federated = self.backend.federated
        self.key = key if key is not None else os.urandom(32)
        self.validation = settings.validation
        self.rate = settings.rate
        self.burst = float(settings.burst)
        self.idle_timeout = settings.idle_timeout
        self.max_message = settings.max_message
        self.max_members_per_ip = settings.max_members_per_ip
        #: members per client address (L{peer_key})
        self.peers: dict[str, int] = {}
        self.blocked_ports = LOOP_PORTS | own_ports
        self.members: dict[Address, Member] = {}
        self.nicks: dict[str, Member] = {}
        self.rooms: dict[str, Room] = {}
        default = _ROOM.fullmatch(settings.default_room)
        assert default is not None
        self.default_room = default.group(1)
        self._room(self.default_room)
        #: address -> [bytes received, bytes sent] until it is validated
        self.pending: OrderedDict[Address, list[int]] = OrderedDict()
        #: client address -> its addresses in C{pending}, least recent first
        self.pending_peers: dict[str, OrderedDict[Address, None]] = {}
        #: replies to strangers, per address (IP and port) and in total
        self.strangers = RateLimiter(
            settings.rate,
            settings.burst,
            self.handshake_rate,
            clock,
            max_sources=self.max_pending,
        )
        #: and per client address: what its most members would get, so
        #: one host's ports cannot take the whole handshake budget
        self.stranger_hosts = RateLimiter(
            settings.rate * settings.max_members_per_ip,
            settings.burst * settings.max_members_per_ip,
            self.handshake_rate,
            clock,
            max_sources=self.max_pending,
        )
        self.output = TokenBucket(
            settings.total_output_rate,
            max(settings.total_output_rate, settings.max_room_members),
            clock,
        )
        self.shares = FairShare(self.output, settings.max_room_members, clock)
        self._guests = 0
        #: the protocol that reports the shared counters (one per state)
        self.reporter: object | None = None
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "relayed",
                "joined",
                "timed_out",
                "rate_limited",
                "output_dropped",
                "address_share",
                "refused_full",
                "refused_per_ip",
                "oversized",
                "invalid",
                "stranger_dropped",
                "stranger_bytes_in",
                "stranger_bytes_out",
            ),
            0,
        )

    def reconfigure(self, settings: ChatSettings, max_message: int) -> None:
        """
        A reload: new limits, rules and default room apply at once (members
        keep their names and rooms); C{max_message} is capped by the caller
        at what its ports read.
        """
        self.settings = settings
        self.validation = settings.validation
        self.rate = settings.rate
        self.burst = float(settings.burst)
        self.idle_timeout = settings.idle_timeout
        self.max_message = max_message
        self.max_members_per_ip = settings.max_members_per_ip
        self.strangers.rate = settings.rate
        self.strangers.burst = settings.burst
        self.stranger_hosts.rate = settings.rate * settings.max_members_per_ip
        self.stranger_hosts.burst = settings.burst * settings.max_members_per_ip
        self.output.rate = settings.total_output_rate
        self.output.burst = max(settings.total_output_rate, settings.max_room_members)
        self.shares.floor = settings.max_room_members
        default = _ROOM.fullmatch(settings.default_room)
        assert default is not None
        if self._room(default.group(1)) is not None:
            self.default_room = default.group(1)
        for room in self.rooms.values():
            if room.history.maxlen != settings.history:
                room.history = deque(room.history, maxlen=settings.history)

    # --- datagrams in ----------------------------------------------------

    def receive(self, out: Sender, addr: Address, size: int, text: str) -> None:
        """One datagram of C{size} bytes, decoded and made safe by L{clean}."""
        member = self.members.get(addr)
        if member is None:
            self._stranger(out, addr, size, text)
            return
        now = self.clock.seconds()
        member.seen = now
        member.out = out
        text = text.rstrip("\n")
        if "\n" in text:
            for line in text.split("\n"):
                if addr not in self.members:
                    return  # /quit on an earlier line
                if line and self._charge(member, now):
                    self._line(member, line)
        elif text and self._charge(member, now):
            self._line(member, text)

    def refuse(
        self,
        out: Sender,
        addr: Address,
        size: int,
        reason: str,
        code: Literal["oversized", "invalid"],
    ) -> None:
        """A datagram too large or not UTF-8: one error line, counted by C{code}."""
        self.stats[code] += 1
        line = f"*** error: {reason}\n".encode()
        member = self.members.get(addr)
        if member is None:
            if self._stranger_allowed(addr, size):
                self._to_stranger(out, addr, [line])
            return
        now = self.clock.seconds()
        member.seen = now
        if self._charge(member, now):
            self._tell(member, line)

    def _charge(self, member: Member, now: float) -> bool:
        # The member's own token bucket, inline: this is the hot path.
        tokens = member.tokens + (now - member.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        member.stamp = now
        if tokens >= 1.0:
            member.tokens = tokens - 1.0
            member.throttled = False
            return True
        member.tokens = tokens
        self.stats["rate_limited"] += 1
        if not member.throttled:
            member.throttled = True
            self._tell(
                member,
                f"*** error: too fast; at most {self.rate:g} messages a second "
                f"(bursts of {self.burst:g}); dropped\n".encode(),
            )
        return False

    def _line(self, member: Member, line: str) -> None:
        if line[0] != "/":
            self._say(member, line)
        elif line[:2] == "//":
            self._say(member, line[1:])
        else:
            command, _, argument = line[1:].partition(" ")
            handler = self._commands.get(command.lower())
            if handler is None:
                self._tell(
                    member,
                    f"*** error: unknown command /{command[:32]}; "
                    "/help lists the commands\n".encode(),
                )
                return
            handler(self, member, argument.strip())

    # --- strangers and validation -----------------------------------------

    def _stranger_allowed(self, addr: Address, size: int) -> bool:
        """Count what a stranger sent; may it be answered at all?"""
        self.stats["stranger_bytes_in"] += size
        peer = peer_key(addr[0])
        pending = self.pending.get(addr)
        if pending is None:
            # Forgetting both counts keeps sent <= 3 x received for every
            # stretch an address is remembered, so in total.
            mine = self.pending_peers.get(peer)
            if mine is not None and len(mine) >= self.max_pending_per_ip:
                self._forget(next(iter(mine)))  # its own, not another's
            elif len(self.pending) >= self.max_pending:
                self._forget(next(iter(self.pending)))
            pending = self.pending[addr] = [0, 0]
            self.pending_peers.setdefault(peer, OrderedDict())[addr] = None
        else:
            self.pending.move_to_end(addr)
            self.pending_peers[peer].move_to_end(addr)
        pending[0] += size
        if (
            addr[1] in self.blocked_ports
            or not self.stranger_hosts.allow(peer)
            or not self.strangers.allow(addr)
        ):
            self.stats["stranger_dropped"] += 1
            return False
        return True

    def _forget(self, addr: Address) -> None:
        """Drop a stranger's byte counts."""
        if self.pending.pop(addr, None) is None:
            return
        peer = peer_key(addr[0])
        mine = self.pending_peers[peer]
        del mine[addr]
        if not mine:
            del self.pending_peers[peer]

    def _no_place(self, addr: Address) -> list[bytes] | None:
        """Why C{addr} cannot become a member now (longest first), or None."""
        if len(self.members) >= self.settings.max_members:
            self.stats["refused_full"] += 1
            return [b"*** error: the chat is full; try later\n"]
        cap = self.max_members_per_ip
        if self.peers.get(peer_key(addr[0]), 0) >= cap:
            self.stats["refused_per_ip"] += 1
            return [
                f"*** error: too many members from your address (at most {cap}); "
                "try later\n".encode(),
                b"*** error: too many members from your address\n",
            ]
        return None

    def _stranger(self, out: Sender, addr: Address, size: int, text: str) -> None:
        if not self._stranger_allowed(addr, size):
            return
        if text.startswith("***"):
            # Our own notice coming back: an echo service at a spoofed
            # address.  Answering would keep a loop going.
            self.stats["stranger_dropped"] += 1
            return
        first, _, rest = text.strip().partition("\n")
        command, _, argument = first.partition(" ")
        if not self.validation:
            member = self._admit(out, addr)
            if member is not None and command.lower() not in ("/v", "/hello"):
                self.receive(out, addr, size, text)
            return
        if command.lower() == "/v" and self.check_token(addr, argument.strip()):
            if self._admit(out, addr) is not None and rest:
                self.receive(out, addr, 0, rest)  # "/v TOKEN\n/nick NAME"
            return
        refusal = self._no_place(addr)
        if refusal is not None:
            self._to_stranger(out, addr, refusal)
            return
        token = self.token(addr)
        room = self.default_room
        self._to_stranger(
            out,
            addr,
            [
                f"*** welcome to sockd chat. To join #{room}, send: /v {token} "
                "(then /nick NAME to pick a name, /help for commands)\n".encode(),
                f"*** welcome to sockd chat; to join, send: /v {token}\n".encode(),
                f"*** to join, send: /v {token}\n".encode(),
                f"*** /v {token}\n".encode(),
            ],
        )

    def _to_stranger(self, out: Sender, addr: Address, choices: list[bytes]) -> None:
        """Send the first of C{choices} that fits the address's credit."""
        pending = self.pending.get(addr)
        if pending is None:
            return
        credit = AMPLIFICATION * pending[0] - pending[1]
        for data in choices:
            if len(data) <= credit:
                pending[1] += len(data)
                self.stats["stranger_bytes_out"] += len(data)
                out.send(data, addr)
                return
        self.stats["stranger_dropped"] += 1

    def token(self, addr: Address, epoch: int | None = None) -> str:
        """The cookie for C{addr}: stateless, good for two epochs."""
        if epoch is None:
            epoch = int(self.clock.seconds() // EPOCH)
        message = f"{epoch}|{addr[0]}|{addr[1]}".encode()
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return base64.b32encode(digest[:5]).decode("ascii").lower()

    def check_token(self, addr: Address, token: str) -> bool:
        # compare_digest raises TypeError on non-ASCII str: refuse those here.
        if len(token) != TOKEN_LENGTH or not token.isascii():
            return False
        token = token.lower()
        epoch = int(self.clock.seconds() // EPOCH)
        return any(
            hmac.compare_digest(self.token(addr, e), token) for e in (epoch, epoch - 1)
        )

    def _admit(self, out: Sender, addr: Address) -> Member | None:
        """A (validated) address becomes a member, in the default room."""
        refusal = self._no_place(addr)
        if refusal is not None:
            if self.validation:
                out.send(refusal[0], addr)  # it proved it receives
            else:
                self._to_stranger(out, addr, refusal)
            return None
        self._forget(addr)
        now = self.clock.seconds()
        self._guests += 1
        member = Member(addr, self.backend.guest_name(self._guests), out, now)
        member.tokens = self.burst
        self.members[addr] = member
        self.peers[member.peer] = self.peers.get(member.peer, 0) + 1
        self.nicks[member.key] = member
        self.stats["joined"] += 1
        self.backend.joined(member)
        log.info(
            "chat: {peer} joined as {nick}",
            peer=escape(f"{addr[0]}:{addr[1]}"),
            nick=member.nick,
        )
        self._tell(
            member,
            f"*** welcome, you are {member.nick}. /nick NAME to pick a name, "
            f"/help for commands; silent members leave after "
            f"{self.idle_timeout:g}s (/ping keeps you here)\n".encode(),
        )
        self._enter(member, self.rooms[self.default_room.lower()])
        return member

    # --- rooms and members -----------------------------------------------

    def _room(self, name: str) -> Room | None:
        key = name.lower()
        room = self.rooms.get(key)
        if room is None:
            if len(self.rooms) >= self.settings.max_rooms:
                return None
            room = self.rooms[key] = Room(name, self.settings.history)
        return room

    def _enter(self, member: Member, room: Room) -> None:
        if len(room.members) >= self.settings.max_room_members:
            self._tell(member, f"*** error: #{room.name} is full; try later\n".encode())
            return
        self._leave(member, "left")
        self._fanout(
            room, f"*** {member.nick} joined #{room.name}\n".encode(), None, member
        )
        fresh = not room.members and not room.history and not room.topic
        room.members[member.addr] = member
        member.room = room
        count = len(room.members)
        self._tell(
            member,
            f"*** you joined #{room.name} ({count} "
            f"member{'s' if count != 1 else ''})\n".encode(),
        )
        if room.topic:
            self._tell(member, f"*** topic: {room.topic}\n".encode())
        if room.history:
            self._tell(
                member,
                f"*** last {len(room.history)} messages in #{room.name}:\n".encode(),
            )
            for line in room.history:
                self._tell(member, line)
        self.backend.entered(member, room, fresh)

    def _leave(self, member: Member, how: str) -> None:
        room = member.room
        if room is None:
            return
        member.room = None
        del room.members[member.addr]
        self._fanout(
            room, f"*** {member.nick} {how} #{room.name}\n".encode(), None, member
        )
        self.backend.left(member, room, how)
        if not room.members and room.name.lower() != self.default_room.lower():
            del self.rooms[room.name.lower()]

    def _remove(self, member: Member, how: str) -> None:
        self._leave(member, how)
        del self.members[member.addr]
        count = self.peers[member.peer] - 1
        if count:
            self.peers[member.peer] = count
        else:
            del self.peers[member.peer]
        if self.nicks.get(member.key) is member:
            del self.nicks[member.key]
        self.backend.removed(member)
        log.info(
            "chat: {nick} {how}",
            nick=member.nick,
            how=how,
        )

    def expire(self) -> int:
        """Drop members silent for longer than the idle timeout."""
        cutoff = self.clock.seconds() - self.idle_timeout
        silent = [m for m in self.members.values() if m.seen < cutoff]
        for member in silent:
            self.stats["timed_out"] += 1
            self._tell(
                member,
                f"*** you were dropped after {self.idle_timeout:g}s of silence; "
                "send anything to come back\n".encode(),
            )
            self._remove(member, "timed out from")
        return len(silent)

    # --- from other nodes (see Backend) --------------------------------------

    def relay(self, room_key: str, line: bytes, keep: bool) -> None:
        """A line from another node for the members here of C{room_key}."""
        room = self.rooms.get(room_key)
        if room is not None and self._fanout(room, line, None, None) is None and keep:
            room.history.append(line)

    def relay_direct(self, key: str, line: bytes) -> bool:
        """A direct message from another node for the member called C{key}."""
        target = self.nicks.get(key)
        if target is None:
            return False
        self._send(target, line, None)
        return True

    def relay_topic(self, room_key: str, topic: str, line: bytes) -> None:
        room = self.rooms.get(room_key)
        if room is not None:
            room.topic = topic
            self._fanout(room, line, None, None)

    def seed(self, member: Member, room: Room, topic: str, lines: list[bytes]) -> None:
        """The cluster's topic and history for a room just made here."""
        if member.room is not room or self.members.get(member.addr) is not member:
            return
        if topic and not room.topic:
            room.topic = topic
            self._tell(member, f"*** topic: {topic}\n".encode())
        if lines and not room.history:
            room.history.extend(lines)
            self._tell(
                member,
                f"*** last {len(room.history)} messages in #{room.name}:\n".encode(),
            )
            for line in room.history:
                self._tell(member, line)

    def unclaimed(self, member: Member) -> None:
        """C{member}'s nickname went to someone else (this node was cut off)."""
        if self.members.get(member.addr) is not member:
            return
        self._guests += 1
        old = member.nick
        self._tell(
            member,
            f"*** {old} was taken on another node while this one was cut "
            "off; /nick NAME to pick another\n".encode(),
        )
        if self.nicks.get(member.key) is member:
            del self.nicks[member.key]
        member.key = ""  # so the rename does not release the other's claim
        self._rename(member, self.backend.guest_name(self._guests))

    # --- output ------------------------------------------------------------

    def _tell(self, member: Member, data: bytes) -> None:
        """Send C{data} to C{member}, on its own address's share."""
        self._send(member, data, member)

    def _send(self, member: Member, data: bytes, payer: Member | None) -> None:
        """Send C{data} to C{member} on C{payer}'s share (None: nobody's)."""
        refused = self.shares.take(payer.peer if payer else None, 1.0)
        if refused is None:
            member.out.send(data, member.addr)
        else:
            self.stats["output_dropped" if refused == "total" else "address_share"] += 1

    def _fanout(
        self, room: Room, data: bytes, sender: Member | None, payer: Member | None
    ) -> str | None:
        """
        Send C{data} to everyone in C{room} but C{sender}, on C{payer}'s
        share; None if sent, else why not (L{FairShare.take}).
        """
        count = len(room.members) - (sender is not None)
        if count <= 0:
            return None
        refused = self.shares.take(payer.peer if payer else None, count)
        if refused is not None:
            self.stats["output_dropped" if refused == "total" else "address_share"] += (
                count
            )
            return refused
        self.stats["relayed"] += count
        for other in room.members.values():
            if other is not sender:
                other.out.send(data, other.addr)
        return None

    def _say(self, member: Member, text: str) -> None:
        self._relay(member, "say", text)

    def _relay(self, member: Member, kind: str, text: str) -> None:
        """Say C{text} (plain, or a C{/me} action) to the member's room."""
        room = member.room
        if room is None:
            self._tell(member, b"*** error: you are in no room; /join ROOM\n")
            return
        if kind == "me":
            line = f"* {member.nick} {text}\n".encode()
        else:
            line = f"<{member.nick}> {text}\n".encode()
        refused = self._fanout(room, line, member, member)
        if refused is None:
            room.history.append(line)
            if self._federated:
                self.backend.said(member, room, kind, text)
        elif refused == "total":
            self._tell(member, b"*** error: the server is busy; not delivered\n")
        else:
            self._tell(
                member,
                b"*** error: your address is over its share of the server's "
                b"output; not delivered\n",
            )

    # --- commands ------------------------------------------------------------

    def nick_problem(self, nick: str) -> str | None:
        """Why C{nick} cannot be taken, or None."""
        limit = self.settings.nick_max_length
        if not nick or len(nick) > limit or not _NICK.fullmatch(nick):
            return (
                f"a nickname is 1 to {limit} letters, digits, '_' or '-', "
                "starting with a letter"
            )
        lowered = nick.lower()
        if lowered in _RESERVED or lowered.startswith("guest"):
            return f"{nick} is reserved"
        return None

    def do_nick(self, member: Member, argument: str) -> None:
        problem = self.nick_problem(argument)
        if problem is not None:
            self._tell(member, f"*** error: {clip(problem)}\n".encode())
            return
        key = argument.lower()
        holder = self.nicks.get(key)
        if holder is not None and holder is not member:
            self._tell(member, f"*** error: {argument} is taken\n".encode())
            return
        if holder is None and self.backend.claim(member, argument):
            return  # the backend answers through claimed()
        self._rename(member, argument)

    def claimed(self, member: Member, nick: str, problem: str | None) -> None:
        """The backend's answer to L{Backend.claim}: rename, or say why not."""
        if self.members.get(member.addr) is not member:
            return  # gone meanwhile; the backend releases the claim
        if problem is None and self.nicks.get(nick.lower()) not in (None, member):
            problem = f"{nick} is taken"
        if problem is not None:
            self._tell(member, f"*** error: {problem}\n".encode())
            return
        self._rename(member, nick)

    def _rename(self, member: Member, argument: str) -> None:
        key = argument.lower()
        old = member.nick
        if self.nicks.get(member.key) is member:
            del self.nicks[member.key]
        member.nick, member.key = argument, key
        self.nicks[key] = member
        self._tell(member, f"*** you are now {argument}\n".encode())
        if member.room is not None:
            self._fanout(
                member.room,
                f"*** {old} is now known as {argument}\n".encode(),
                member,
                member,
            )
        self.backend.renamed(member, old)

    def do_join(self, member: Member, argument: str) -> None:
        match = _ROOM.fullmatch(argument)
        if match is None:
            self._tell(
                member,
                b"*** error: usage: /join ROOM; a room name is 1 to 32 letters, "
                b"digits, '_' or '-'\n",
            )
            return
        name = match.group(1)
        if member.room is not None and member.room.name.lower() == name.lower():
            self._tell(member, f"*** you are already in #{member.room.name}\n".encode())
            return
        room = self._room(name)
        if room is None:
            self._tell(
                member, b"*** error: too many rooms; join an existing one (/rooms)\n"
            )
            return
        self._enter(member, room)
        if not room.members:  # could not enter a room just made
            del self.rooms[room.name.lower()]

    def do_part(self, member: Member, argument: str) -> None:
        room = member.room
        if room is None:
            self._tell(member, b"*** error: you are in no room\n")
            return
        self._leave(member, "left")
        self._tell(
            member, f"*** you left #{room.name}; /join ROOM to enter one\n".encode()
        )

    def do_msg(self, member: Member, argument: str) -> None:
        nick, _, text = argument.partition(" ")
        text = text.strip()
        if not nick or not text:
            self._tell(member, b"*** error: usage: /msg NICK TEXT\n")
            return
        target = self.nicks.get(nick.lower())
        if target is None:
            name = self.backend.direct(member, nick, text)
            if name is not None:
                self._tell(member, f"[msg -> {name}] {text}\n".encode())
                return
            self._tell(member, f"*** error: no one is called {clip(nick)}\n".encode())
            return
        self._send(target, f"[msg] <{member.nick}> {text}\n".encode(), member)
        self._tell(member, f"[msg -> {target.nick}] {text}\n".encode())

    def do_me(self, member: Member, argument: str) -> None:
        if not argument:
            self._tell(member, b"*** error: usage: /me ACTION\n")
            return
        self._relay(member, "me", argument)

    def do_who(self, member: Member, argument: str) -> None:
        room = member.room
        if room is None:
            self._tell(member, b"*** error: you are in no room\n")
            return
        nicks = [m.nick for m in room.members.values()]
        if self._federated:
            nicks += self.backend.who(room.name.lower())
        self._tell(
            member,
            listing(f"*** #{room.name} ({len(nicks)}): ", nicks).encode(),
        )

    def do_rooms(self, member: Member, argument: str) -> None:
        if self._federated:
            counts = self.backend.rooms()
            for key, room in self.rooms.items():
                _, count = counts.get(key, (room.name, 0))
                counts[key] = (room.name, count + len(room.members))
            ordered = sorted(counts.values(), key=lambda r: -r[1])
            items = [f"#{name} ({count})" for name, count in ordered]
            self._tell(member, listing(f"*** {len(items)} rooms: ", items).encode())
            return
        rooms = sorted(self.rooms.values(), key=lambda r: -len(r.members))
        items = [f"#{r.name} ({len(r.members)})" for r in rooms]
        self._tell(member, listing(f"*** {len(items)} rooms: ", items).encode())

    def do_topic(self, member: Member, argument: str) -> None:
        room = member.room
        if room is None:
            self._tell(member, b"*** error: you are in no room\n")
            return
        if not argument:
            topic = room.topic or "(none)"
            self._tell(member, f"*** topic of #{room.name}: {topic}\n".encode())
            return
        room.topic = argument
        self._fanout(
            room,
            f"*** {member.nick} set the topic of #{room.name}: {argument}\n".encode(),
            None,
            member,
        )
        self.backend.topic(member, room)

    def do_ping(self, member: Member, argument: str) -> None:
        self._tell(member, b"*** pong\n")

    def do_help(self, member: Member, argument: str) -> None:
        self._tell(member, HELP.encode())

    def do_quit(self, member: Member, argument: str) -> None:
        self._tell(member, b"*** bye\n")
        self._remove(member, "quit")

    def do_hello(self, member: Member, argument: str) -> None:
        where = f"#{member.room.name}" if member.room else "no room"
        self._tell(member, f"*** you are {member.nick} in {where}\n".encode())

    _commands: dict[str, Callable[[ChatState, Member, str], None]] = {
        "nick": do_nick,
        "join": do_join,
        "part": do_part,
        "msg": do_msg,
        "me": do_me,
        "who": do_who,
        "rooms": do_rooms,
        "topic": do_topic,
        "ping": do_ping,
        "help": do_help,
        "quit": do_quit,
        "hello": do_hello,
        "v": do_hello,
    }


def clip(text: str, limit: int = 64) -> str:
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


@implementer(IReconfigurable, IMetricsSource)
class ChatProtocol(DatagramProtocol):
    """
    Parses chat datagrams (size, UTF-8, terminal safety) for a
    L{ChatState}, and sends what it decides.  The listening port must read
    at least C{max_datagram + 1} bytes, so an oversized datagram is seen as
    such instead of being silently truncated.
    """

    noisy = False
    #: kernel buffer sizes asked for (the kernel caps them at
    #: net.core.rmem_max and wmem_max): a burst of datagrams, spoofed or
    #: not, or a fan-out to a large room should not overflow them
    socket_buffer = 4 * 1024 * 1024

    def __init__(self, state: ChatState) -> None:
        self.state = state
        # A message may end in CRLF on top of the limit.
        self.max_datagram = state.max_message + 2
        #: what the port reads is fixed when it opens: a reload may lower
        #: the message limit, not raise it past this
        self.port_limit = state.max_message
        self.send_errors = 0
        if state.reporter is None:
            state.reporter = self
        self._sendto: Callable[[bytes, Address], object] | None = None

    def startProtocol(self) -> None:
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            return
        # Port.write checks the address's syntax (three parses) on every
        # datagram; ours come from recvfrom, so send straight away: this
        # nearly doubles fan-out.  Errors are the same OSErrors.
        self._sendto = sock.sendto
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):  # else keep the default
                sock.setsockopt(socket.SOL_SOCKET, option, self.socket_buffer)

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        size = len(data)
        if size > self.max_datagram:
            self.state.refuse(
                self,
                addr,
                size,
                f"message longer than {self.state.max_message} bytes",
                "oversized",
            )
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.state.refuse(self, addr, size, "message is not valid UTF-8", "invalid")
            return
        if size > self.state.max_message and (
            len(data.rstrip(b"\r\n")) > self.state.max_message
        ):
            self.state.refuse(
                self,
                addr,
                size,
                f"message longer than {self.state.max_message} bytes",
                "oversized",
            )
            return
        self.state.receive(self, addr, size, clean(text))

    def stopProtocol(self) -> None:
        self._sendto = None

    def reconfigure(self, config: Config) -> None:
        """A reload (SIGHUP): the shared state takes the new settings."""
        settings = config.chat
        max_message = min(settings.max_message, self.port_limit)
        self.max_datagram = max_message + 2
        if self.state.settings is not settings:
            self.state.reconfigure(settings, max_message)

    def metrics(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Counters for L{sockd.core.metrics}; the shared state's only once."""
        chat = {"service": "chat"}
        samples: list[tuple[str, str, dict[str, str], float]] = [
            (
                "datagrams_dropped_total",
                "counter",
                {**chat, "reason": "send_error"},
                self.send_errors,
            )
        ]
        state = self.state
        if state.reporter is not self:
            return samples
        samples += state.backend.metrics()
        stats = state.stats
        samples += [
            ("chat_members", "gauge", chat, len(state.members)),
            ("chat_rooms", "gauge", chat, len(state.rooms)),
            ("chat_relayed_total", "counter", chat, stats["relayed"]),
            ("chat_joined_total", "counter", chat, stats["joined"]),
            ("chat_timed_out_total", "counter", chat, stats["timed_out"]),
            (
                "chat_refused_total",
                "counter",
                {**chat, "reason": "total"},
                stats["refused_full"],
            ),
            (
                "chat_refused_total",
                "counter",
                {**chat, "reason": "per_ip"},
                stats["refused_per_ip"],
            ),
        ]
        for reason in (
            "rate_limited",
            "output_dropped",
            "address_share",
            "oversized",
            "invalid",
            "stranger_dropped",
        ):
            samples.append(
                (
                    "datagrams_dropped_total",
                    "counter",
                    {**chat, "reason": reason},
                    stats[reason],
                )
            )
        return samples

    def send(self, data: bytes, addr: Address) -> None:
        try:
            if self._sendto is not None:
                self._sendto(data, addr)
            else:
                self.transport.write(data, addr)  # type: ignore[union-attr]
        except (OSError, MessageLengthError) as e:
            # ENOBUFS, EAGAIN, EHOSTUNREACH...: count it, serve the others.
            self.send_errors += 1
            log.debug(
                "chat: sendto {peer} failed: {error}",
                peer=escape(str(addr)),
                error=str(e),
            )
