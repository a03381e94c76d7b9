"""
The chat relay's decisions, with no I/O: one message per datagram, UTF-8
text, a client is its source address.  The wire protocol is in
C{docs/protocol-chat.md}.

L{ChatState} decides everything (members, rooms, nicknames, presence,
history, address validation, rate limits) and talks back through a
L{Sender}; it reads time from the clock it is given.  L{Backend} is what it
tells other nodes (L{sockd.chat.federation}); L{sockd.chat.protocol} is the
datagram I/O and L{sockd.chat.text} the text rules.

Address validation follows the QUIC rule (RFC 9000, section 8.1): until an
address returns the cookie it was sent (an HMAC of address and epoch under a
per-process random key), it gets at most three times the bytes it sent, and
no room traffic at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Literal, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sockd.chat.text import (
    BYE,
    PONG,
    clip,
    event_line,
    listing,
    nick_problem,
    room_name,
)
from sockd.core.config import ChatSettings
from sockd.core.interfaces import PeerAddress, Reason
from sockd.core.limits import LOOP_PORTS, RateLimiter, TokenBucket, peer_key
from sockd.core.logs import escape

__all__ = [
    "AMPLIFICATION",
    "DROPPED",
    "EPOCH",
    "HELP",
    "Backend",
    "ChatState",
    "FairShare",
    "LocalBackend",
    "Member",
    "Room",
    "Sender",
]

log = Logger(namespace="sockd.chat")

#: an unvalidated address gets at most this many times the bytes it sent
AMPLIFICATION = 3


#: why the chat drops a datagram, received or owed (C{send_error} is the
#: protocol's own count)
DROPPED: tuple[Reason, ...] = (
    "rate_limited",
    "total",
    "share",
    "oversized",
    "invalid",
    "loop",
    "amplification",
)

#: cookies are good for the epoch they were made in and the next one
EPOCH = 120.0
TOKEN_LENGTH = 8

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


class Sender(Protocol):
    """Where the state's datagrams go."""

    def send(self, data: bytes, addr: PeerAddress) -> None: ...

    def send_many(self, data: bytes, addrs: list[PeerAddress]) -> None:
        """C{send} to each of C{addrs} in turn (a fan-out, in one call)."""


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
        "bucket",
        "bumped",
        "key",
        "nick",
        "out",
        "peer",
        "room",
        "seen",
        "throttled",
    )

    def __init__(
        self, addr: PeerAddress, nick: str, out: Sender, bucket: TokenBucket
    ) -> None:
        self.addr = addr
        #: the client address it counts under (L{peer_key}: IPv4, IPv6 /64)
        self.peer = peer_key(addr[0])
        self.nick = nick
        self.key = nick.lower()
        self.out = out
        self.room: Room | None = None
        self.seen = bucket.stamp  # now: the bucket was just made
        #: its messages, at the chat's C{rate} and C{burst}
        self.bucket = bucket
        #: told it is too fast, and nothing passed since
        self.throttled = False
        #: the nickname another member took while this one was silent,
        #: until it is told
        self.bumped: str | None = None


class Room:
    """Members (by address), topic and recent messages of one room."""

    __slots__ = ("history", "members", "name", "topic")

    def __init__(self, name: str, history: int) -> None:
        self.name = name
        self.members: dict[PeerAddress, Member] = {}
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

    def take(self, peer: str | None, cost: float) -> Reason | None:
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
        self.members: dict[PeerAddress, Member] = {}
        self.nicks: dict[str, Member] = {}
        self.rooms: dict[str, Room] = {}
        default = room_name(settings.default_room)
        assert default is not None  # checked by the config
        self.default_room = default
        self._room(self.default_room)
        #: address -> [bytes received, bytes sent] until it is validated
        self.pending: OrderedDict[PeerAddress, list[int]] = OrderedDict()
        #: client address -> its addresses in C{pending}, least recent first
        self.pending_peers: dict[str, OrderedDict[PeerAddress, None]] = {}
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
                "stranger_bytes_in",
                "stranger_bytes_out",
            ),
            0,
        )
        #: datagrams dropped (in, or owed out), by reason
        self.dropped: dict[Reason, int] = dict.fromkeys(DROPPED, 0)
        #: joins refused, by reason
        self.refused: dict[Reason, int] = {"total": 0, "per_ip": 0}

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
        for member in self.members.values():
            member.bucket.rate, member.bucket.burst = self.rate, self.burst
        self.strangers.rate = settings.rate
        self.strangers.burst = settings.burst
        self.stranger_hosts.rate = settings.rate * settings.max_members_per_ip
        self.stranger_hosts.burst = settings.burst * settings.max_members_per_ip
        self.output.rate = settings.total_output_rate
        self.output.burst = max(settings.total_output_rate, settings.max_room_members)
        self.shares.floor = settings.max_room_members
        default = room_name(settings.default_room)
        assert default is not None
        if self._room(default) is not None:
            self.default_room = default
        for room in self.rooms.values():
            if room.history.maxlen != settings.history:
                room.history = deque(room.history, maxlen=settings.history)

    def use_backend(self, backend: Backend) -> None:
        """Tell and ask C{backend} from now on (a federation attaching)."""
        self.backend = backend
        self._federated = backend.federated

    # --- datagrams in ----------------------------------------------------

    def receive(self, out: Sender, addr: PeerAddress, size: int, text: str) -> None:
        """One datagram of C{size} bytes, decoded and made terminal-safe."""
        member = self.members.get(addr)
        if member is None:
            self._stranger(out, addr, size, text)
            return
        member.seen = self.clock.seconds()
        member.out = out
        if member.bumped is not None:
            self._tell_bumped(member)
        text = text.rstrip("\n")
        if "\n" in text:
            for line in text.split("\n"):
                if addr not in self.members:
                    return  # /quit on an earlier line
                if line and self._charge(member):
                    self._line(member, line)
        elif text and self._charge(member):
            self._line(member, text)

    def refuse(
        self,
        out: Sender,
        addr: PeerAddress,
        size: int,
        reason: str,
        code: Literal["oversized", "invalid"],
    ) -> None:
        """A datagram too large or not UTF-8: one error line, counted by C{code}."""
        self.dropped[code] += 1
        line = f"*** error: {reason}\n".encode()
        member = self.members.get(addr)
        if member is None:
            if self._stranger_allowed(addr, size):
                self._to_stranger(out, addr, [line])
            return
        member.seen = self.clock.seconds()
        if self._charge(member):
            self._tell(member, line)

    def _charge(self, member: Member) -> bool:
        """May C{member} send one more message now?  Tells it once if not."""
        if member.bucket.take():
            member.throttled = False
            return True
        self.dropped["rate_limited"] += 1
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
                    f"*** error: unknown command /{clip(command, 32)}; "
                    "/help lists the commands\n".encode(),
                )
                return
            handler(self, member, argument.strip())

    # --- strangers and validation -----------------------------------------

    def _stranger_allowed(self, addr: PeerAddress, size: int) -> bool:
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
        if addr[1] in self.blocked_ports:
            self.dropped["loop"] += 1
            return False
        if not self.stranger_hosts.allow(peer) or not self.strangers.allow(addr):
            self.dropped["rate_limited"] += 1
            return False
        return True

    def _forget(self, addr: PeerAddress) -> None:
        """Drop a stranger's byte counts."""
        if self.pending.pop(addr, None) is None:
            return
        peer = peer_key(addr[0])
        mine = self.pending_peers[peer]
        del mine[addr]
        if not mine:
            del self.pending_peers[peer]

    def _no_place(self, addr: PeerAddress) -> list[bytes] | None:
        """Why C{addr} cannot become a member now (longest first), or None."""
        if len(self.members) >= self.settings.max_members:
            self.refused["total"] += 1
            return [b"*** error: the chat is full; try later\n"]
        cap = self.max_members_per_ip
        if self.peers.get(peer_key(addr[0]), 0) >= cap:
            self.refused["per_ip"] += 1
            return [
                f"*** error: too many members from your address (at most {cap}); "
                "try later\n".encode(),
                b"*** error: too many members from your address\n",
            ]
        return None

    def _stranger(self, out: Sender, addr: PeerAddress, size: int, text: str) -> None:
        if not self._stranger_allowed(addr, size):
            return
        if text.startswith("***"):
            # Our own notice coming back: an echo service at a spoofed
            # address.  Answering would keep a loop going.
            self.dropped["loop"] += 1
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
        # Each ends in the machine line with the cookie; that line alone is
        # the shortest, so a tiny first datagram's credit still buys it.
        event = event_line("v", token)
        verb = command.lower()
        if verb == "/v" and argument.strip():
            prompts = [
                f"*** that join code is wrong or expired; send: /v {token}\n",
                f"*** wrong or expired code; send: /v {token}\n",
            ]
        elif verb == "/help":
            prompts = [
                f"*** you are not in the chat yet. To join #{room}, send: "
                f"/v {token} (a code for your address, good for 2 to 4 "
                "minutes); then /help lists the commands\n",
                f"*** not joined yet; to join, send: /v {token}\n",
            ]
        else:
            prompts = [
                f"*** welcome to sockd chat. To join #{room}, send: /v {token} "
                "(then /nick NAME to pick a name, /help for commands)\n",
                f"*** welcome to sockd chat; to join, send: /v {token}\n",
            ]
        prompts += [f"*** to join, send: /v {token}\n", ""]
        self._to_stranger(out, addr, [(p + event).encode() for p in prompts])

    def _to_stranger(
        self, out: Sender, addr: PeerAddress, choices: list[bytes]
    ) -> None:
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
        self.dropped["amplification"] += 1

    def token(self, addr: PeerAddress, epoch: int | None = None) -> str:
        """The cookie for C{addr}: stateless, good for two epochs."""
        if epoch is None:
            epoch = int(self.clock.seconds() // EPOCH)
        message = f"{epoch}|{addr[0]}|{addr[1]}".encode()
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return base64.b32encode(digest[:5]).decode("ascii").lower()

    def check_token(self, addr: PeerAddress, token: str) -> bool:
        # compare_digest raises TypeError on non-ASCII str: refuse those here.
        if len(token) != TOKEN_LENGTH or not token.isascii():
            return False
        token = token.lower()
        epoch = int(self.clock.seconds() // EPOCH)
        return any(
            hmac.compare_digest(self.token(addr, e), token) for e in (epoch, epoch - 1)
        )

    def _admit(self, out: Sender, addr: PeerAddress) -> Member | None:
        """A (validated) address becomes a member, in the default room."""
        refusal = self._no_place(addr)
        if refusal is not None:
            if self.validation:
                out.send(refusal[0], addr)  # it proved it receives
            else:
                self._to_stranger(out, addr, refusal)
            return None
        self._forget(addr)
        self._guests += 1
        bucket = TokenBucket(self.rate, self.burst, self.clock)  # a full one
        member = Member(addr, self.backend.guest_name(self._guests), out, bucket)
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
            f"{self.idle_timeout:g}s (/ping keeps you here)\n"
            f"{event_line('welcome', nick=member.nick)}".encode(),
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
            f"member{'s' if count != 1 else ''})\n"
            f"{event_line('room', room.name)}".encode(),
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
                f"send anything to come back\n{event_line('dropped')}".encode(),
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
            self.dropped[refused] += 1

    def _fanout(
        self, room: Room, data: bytes, sender: Member | None, payer: Member | None
    ) -> Reason | None:
        """
        Send C{data} to everyone in C{room} but C{sender}, on C{payer}'s
        share; None if sent, else why not (L{FairShare.take}).
        """
        count = len(room.members) - (sender is not None)
        if count <= 0:
            return None
        refused = self.shares.take(payer.peer if payer else None, count)
        if refused is not None:
            self.dropped[refused] += count
            return refused
        self.stats["relayed"] += count
        members = room.members.values()
        # Usually every member came in through the same port: one call for
        # all of them.  Members of other ports (several listen_udp) follow.
        out = sender.out if sender is not None else next(iter(members)).out
        addrs = [m.addr for m in members if m.out is out and m is not sender]
        out.send_many(data, addrs)
        if len(addrs) < count:
            for other in members:
                if other.out is not out and other is not sender:
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

    def do_nick(self, member: Member, argument: str) -> None:
        problem = nick_problem(argument, self.settings.nick_max_length)
        if problem is not None:
            self._tell(member, f"*** error: {problem}\n".encode())
            return
        key = argument.lower()
        holder = self.nicks.get(key)
        if holder is not None and holder is not member:
            wait = self._reclaim_wait(member, holder)
            if wait > 0:
                self.taken(member, argument, wait)
                return
            self._bump(holder)
            holder = None
        if holder is None and self.backend.claim(member, argument):
            return  # the backend answers through claimed()
        self._rename(member, argument)

    def _reclaim_wait(self, member: Member, holder: Member) -> float:
        """
        Seconds until C{member} may take C{holder}'s nickname, if the holder
        stays silent: C{nick_reclaim} of silence from the holder's own client
        address (L{peer_key}: a client restarted on a new port), else
        C{nick_grace}; a member speaking keeps its name.
        """
        same_host = member.peer == holder.peer
        grace = self.settings.nick_reclaim if same_host else self.settings.nick_grace
        return grace - (self.clock.seconds() - holder.seen)

    def _bump(self, holder: Member) -> None:
        """Give a silent C{holder} a guest name; it is told when it speaks."""
        self._guests += 1
        holder.bumped = holder.nick
        log.info(
            "chat: {nick} went silent and its nickname was taken",
            nick=holder.nick,
        )
        self._rename(holder, self.backend.guest_name(self._guests), tell=False)

    def _tell_bumped(self, member: Member) -> None:
        old, member.bumped = member.bumped, None
        self._tell(
            member,
            f"*** while you were silent, another member took your nickname "
            f"{old}; you are now {member.nick} (/nick NAME to pick another)\n"
            f"{event_line('nick', member.nick)}".encode(),
        )

    def taken(self, member: Member, nick: str, wait: float | None = None) -> None:
        """
        Tell C{member} that C{nick} is someone else's; C{wait}: the seconds
        until it is free if its holder (here) stays silent.
        """
        if wait is None:
            self._tell(
                member,
                f"*** error: {nick} is taken\n{event_line('taken', nick)}".encode(),
            )
            return
        seconds = str(math.ceil(wait))
        self._tell(
            member,
            f"*** error: {nick} is taken; free if its holder stays silent "
            f"{seconds}s more\n{event_line('taken', nick, retry=seconds)}".encode(),
        )

    def claimed(self, member: Member, nick: str, problem: str | None) -> None:
        """The backend's answer to L{Backend.claim}: rename, or say why not."""
        if self.members.get(member.addr) is not member:
            return  # gone meanwhile; the backend releases the claim
        holder = self.nicks.get(nick.lower())
        if problem is None and holder is not None and holder is not member:
            self.taken(member, nick, max(0.0, self._reclaim_wait(member, holder)))
            return
        if problem is not None:
            self._tell(member, f"*** error: {problem}\n".encode())
            return
        self._rename(member, nick)

    def _rename(self, member: Member, argument: str, tell: bool = True) -> None:
        key = argument.lower()
        old = member.nick
        if self.nicks.get(member.key) is member:
            del self.nicks[member.key]
        member.nick, member.key = argument, key
        self.nicks[key] = member
        if tell:
            self._tell(
                member,
                f"*** you are now {argument}\n{event_line('nick', argument)}".encode(),
            )
        if member.room is not None:
            self._fanout(
                member.room,
                f"*** {old} is now known as {argument}\n".encode(),
                member,
                member,
            )
        self.backend.renamed(member, old)

    def do_join(self, member: Member, argument: str) -> None:
        name = room_name(argument)
        if name is None:
            self._tell(
                member,
                b"*** error: usage: /join ROOM; a room name is 1 to 32 letters, "
                b"digits, '_' or '-'\n",
            )
            return
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
        self._tell(member, f"{PONG}\n".encode())

    def do_help(self, member: Member, argument: str) -> None:
        self._tell(member, HELP.encode())

    def do_quit(self, member: Member, argument: str) -> None:
        self._tell(member, f"{BYE}\n".encode())
        self._remove(member, "quit")

    def do_hello(self, member: Member, argument: str) -> None:
        room = member.room.name if member.room else None
        where = f"#{room}" if room else "no room"
        event = event_line("member", nick=member.nick, room=room)
        self._tell(member, f"*** you are {member.nick} in {where}\n{event}".encode())

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
