"""
Chat federation: several sockd-chat nodes on one Redis behave as one chat
(C{[chat] backend = redis}).  The protocol notes are in
C{docs/protocol-chat.md}, section "Federation".

L{Federation} is the L{sockd.chat.state.Backend} a
L{sockd.chat.state.ChatState} calls: it publishes what happens here, relays
what other nodes publish, keeps a view of the members elsewhere (for
C{/who}, C{/rooms} and C{/msg}), claims nicknames cluster-wide and notices
dead nodes.  It talks to Redis only through a L{Store} and reads time from
the clock it is given, so it is tested without Redis; L{sockd.chat.redis}
is that store over txredisapi.

In Redis, under the key prefix: C{nick:NICK} (the node and spelling that
own a nickname, expiring unless renewed), C{node:NODE} (a hash of that
node's members and their rooms, expiring with the node), C{nodes} (the set
of node names), C{hist:ROOM} and C{topic:ROOM}, and the channel C{events}.
Nothing read from Redis is trusted: every event and entry is checked for
size and form, and text is made terminal-safe again, before use.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockd.chat.state import Backend, ChatState, Member, Room
from sockd.chat.text import NICK, clean, room_name
from sockd.core.config import ChatSettings

__all__ = [
    "MAX_NODES",
    "NICK_LIMIT",
    "NODE",
    "Federation",
    "Store",
]

log = Logger(namespace="sockd.chat")

#: a node name, as it may appear in Redis
NODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOW = frozenset({"left", "quit", "timed out from"})
#: longest nickname accepted from another node (its limit may differ)
NICK_LIMIT = 64
#: other nodes kept in the view; more are not believed
MAX_NODES = 256
Sample = tuple[str, str, dict[str, str], float]


class Store(Protocol):
    """What the federation asks of Redis; every answer is a Deferred."""

    def publish(self, payload: str, room: str = "", keep: int = 0) -> bool: ...
    def member(self, key: str, value: str | None) -> None: ...
    def claim(self, key: str, value: str, ttl: float) -> Deferred[bool]: ...
    def release(self, key: str, value: str) -> None: ...
    def heartbeat(
        self, members: dict[str, str], claims: list[tuple[str, str]], ttl: float
    ) -> Deferred[list[int]]: ...
    def snapshot(self) -> Deferred[dict[str, dict[str, str]]]: ...
    def forget(self, node: str) -> None: ...
    def set_topic(self, room: str, topic: str) -> None: ...
    def recall(self, room: str, keep: int) -> Deferred[tuple[str, list[str]]]: ...


class Federation(Backend, Service):
    """
    The chat backend for a node of a cluster: see the module docstring.
    L{attach} it to its state; start it as a service (heartbeat and
    snapshot every third of C{presence_timeout}).
    """

    federated = True

    def __init__(
        self,
        settings: ChatSettings,
        node: str,
        tag: str,
        clock: IReactorTime,
    ) -> None:
        self.node = node
        self.tag = tag
        self.clock = clock
        self.ttl = settings.presence_timeout
        self.settings = settings
        self.state: ChatState | None = None
        self.store: Store | None = None
        self.connected = False
        #: members elsewhere: node -> nick key -> (nick, room name or "")
        self.view: dict[str, dict[str, tuple[str, str]]] = {}
        #: nick keys claimed in Redis for members here -> claim value
        self.claims: dict[str, str] = {}
        #: events received so far, and the count when each node was last
        #: heard: a snapshot older than a node's last event keeps the view
        #: the events made (they are newer)
        self.heard = 0
        self.last_heard: dict[str, int] = {}
        self._beat: LoopingCall | None = None
        self._lost_at: float | None = None
        self._resyncing = False
        self._max_remote: int | None = None
        self.stats: dict[str, int] = dict.fromkeys(
            ("published", "received", "invalid", "unsent", "lost_claims", "outages"),
            0,
        )
        self.setName("chat federation")

    # Limits follow the state's settings, so a reload (SIGHUP) applies here.

    @property
    def history(self) -> int:
        return (self.state.settings if self.state else self.settings).history

    @property
    def max_message(self) -> int:
        return self.state.max_message if self.state else self.settings.max_message

    @property
    def max_event(self) -> int:
        """Longest event accepted from Redis, in characters."""
        return 4 * self.max_message + 1024

    @property
    def max_remote(self) -> int:
        """Members believed per other node (their limit may differ a bit)."""
        if self._max_remote is not None:
            return self._max_remote
        return 2 * (self.state.settings if self.state else self.settings).max_members

    @max_remote.setter
    def max_remote(self, value: int) -> None:
        self._max_remote = value

    def attach(self, state: ChatState, store: Store) -> None:
        self.state = state
        self.store = store
        state.use_backend(self)

    # --- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._beat = LoopingCall(self.beat)
        self._beat.clock = self.clock
        self._beat.start(self.ttl / 3, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if self.store is not None and self.connected:
            # Leave promptly rather than after the presence timeout.
            self._publish({"k": "gone"})
            for key, value in self.claims.items():
                self.store.release(key, value)
            self.store.forget(self.node)
        self.connected = False  # what follows is no outage

    # --- connection state (called by the store) -------------------------

    def up(self) -> None:
        """Redis answers (again): resync presence and the view."""
        if self.connected:
            return
        self.connected = True
        if self._lost_at is None:
            log.info("chat: federation: connected to Redis")
        else:
            log.info(
                "chat: federation: Redis is back after {outage:.1f}s; "
                "resyncing presence",
                outage=self.clock.seconds() - self._lost_at,
            )
            self._lost_at = None
            self._resyncing = True
        self.beat()

    def down(self, why: str) -> None:
        if not self.connected:
            return
        self.connected = False
        self._lost_at = self.clock.seconds()
        self.stats["outages"] += 1
        # Members elsewhere cannot be reached now: forget them quietly;
        # the next snapshot after the reconnection brings them back.
        self.view.clear()
        log.warn(
            "chat: federation: lost Redis ({why}); degraded: local delivery "
            "only until it is back",
            why=why,
        )

    # --- Backend hooks (this node's members) ------------------------------

    def guest_name(self, number: int) -> str:
        return f"guest-{number}-{self.tag}"

    def _where(self, member: Member) -> str:
        return f"{member.nick}\t{member.room.name if member.room else ''}"

    def joined(self, member: Member) -> None:
        if self.store is not None and self.connected:
            self.store.member(member.key, self._where(member))

    def entered(self, member: Member, room: Room, fresh: bool) -> None:
        if self.store is None or not self.connected:
            return
        self.store.member(member.key, self._where(member))
        self._publish({"k": "enter", "r": room.name, "f": member.nick})
        if fresh and self.history >= 0:
            recall = self.store.recall(room.name.lower(), self.history)
            recall.addCallback(self._seed, member, room)
            recall.addErrback(self._failed, "history")

    def _seed(self, found: tuple[str, list[str]], member: Member, room: Room) -> None:
        topic, payloads = found
        lines = []
        for payload in payloads:
            event = self._event(payload)
            line = None if event is None else self._render(event)
            if line is not None:
                lines.append(line)
        topic = (self._text(topic) or "") if topic else ""
        assert self.state is not None
        self.state.seed(member, room, topic, lines)

    def left(self, member: Member, room: Room, how: str) -> None:
        if self.store is None or not self.connected:
            return
        if how == "left":  # still here, in no room (yet)
            self.store.member(member.key, f"{member.nick}\t")
        self._publish({"k": "leave", "r": room.name, "f": member.nick, "h": how})

    def removed(self, member: Member) -> None:
        value = self.claims.pop(member.key, None)
        if self.store is None or not self.connected:
            return
        self.store.member(member.key, None)
        if value is not None:
            self.store.release(member.key, value)

    def said(self, member: Member, room: Room, kind: str, text: str) -> None:
        if self.store is None or not self.connected:
            self.stats["unsent"] += 1
            return
        event = {"k": kind, "r": room.name, "f": member.nick, "x": text}
        self._publish(event, room.name.lower())

    def renamed(self, member: Member, old: str) -> None:
        old_key = old.lower()
        value = None if old_key == member.key else self.claims.pop(old_key, None)
        if self.store is None or not self.connected:
            return
        if old_key != member.key:
            self.store.member(old_key, None)
            if value is not None:
                self.store.release(old_key, value)
        self.store.member(member.key, self._where(member))
        self._publish(
            {
                "k": "nick",
                "r": member.room.name if member.room else "",
                "f": old,
                "t": member.nick,
            }
        )

    def topic(self, member: Member, room: Room) -> None:
        if self.store is None or not self.connected:
            self.stats["unsent"] += 1
            return
        self._publish({"k": "topic", "r": room.name, "f": member.nick, "x": room.topic})
        self.store.set_topic(room.name.lower(), room.topic)

    def claim(self, member: Member, nick: str) -> bool:
        assert self.state is not None
        state = self.state
        key = nick.lower()
        if self.store is None or not self.connected:
            state.claimed(
                member,
                nick,
                "nickname changes wait until this node is back in touch with "
                "the cluster; try later",
            )
            return True
        for members in self.view.values():
            if key in members:
                # Held on another node: only that node sees its silence.
                state.taken(member, nick)
                return True
        # The owner of a claim is the node; the spelling is in its hash.
        value = f"{self.node}\t{key}"

        def answer(won: bool) -> None:
            if not won:
                if state.members.get(member.addr) is member:
                    state.taken(member, nick)
                return
            self.claims[key] = value
            state.claimed(member, nick, None)
            if member.key != key:  # refused here after all, or gone
                self.claims.pop(key, None)
                if self.store is not None:
                    self.store.release(key, value)

        result = self.store.claim(key, value, self.ttl)
        result.addCallback(answer)
        result.addErrback(self._failed, "nickname claim")
        return True

    def direct(self, member: Member, nick: str, text: str) -> str | None:
        key = nick.lower()
        for members in self.view.values():
            found = members.get(key)
            if found is not None:
                self._publish({"k": "msg", "f": member.nick, "t": key, "x": text})
                return found[0]
        return None

    def who(self, room: str) -> list[str]:
        return [
            nick
            for members in self.view.values()
            for nick, where in members.values()
            if where.lower() == room
        ]

    def rooms(self) -> dict[str, tuple[str, int]]:
        counts: dict[str, tuple[str, int]] = {}
        for members in self.view.values():
            for _, where in members.values():
                if where:
                    name, count = counts.get(where.lower(), (where, 0))
                    counts[where.lower()] = (name, count + 1)
        return counts

    def metrics(self) -> list[Sample]:
        chat = {"service": "chat"}
        samples: list[Sample] = [
            ("chat_redis_connected", "gauge", chat, float(self.connected)),
            (
                "chat_remote_members",
                "gauge",
                chat,
                float(sum(len(m) for m in self.view.values())),
            ),
        ]
        for key in ("published", "received", "invalid", "unsent", "outages"):
            samples.append(
                (f"chat_redis_{key}_total", "counter", chat, self.stats[key])
            )
        return samples

    # --- presence -------------------------------------------------------------

    def beat(self) -> None:
        """Renew this node's presence and claims, then refresh the view."""
        if self.store is None or self.state is None or not self.connected:
            return
        members = {m.key: self._where(m) for m in self.state.members.values()}
        claims = list(self.claims.items())
        renewed = self.store.heartbeat(members, claims, self.ttl)
        renewed.addCallback(self._renewed, claims, self._resyncing)
        self._resyncing = False
        renewed.addErrback(self._failed, "heartbeat")
        snapshot = self.store.snapshot()
        snapshot.addCallback(self.apply_snapshot, self.heard)
        snapshot.addErrback(self._failed, "snapshot")

    def _renewed(
        self, lost: list[int], claims: list[tuple[str, str]], resync: bool
    ) -> None:
        assert self.state is not None
        if resync:
            log.info(
                "chat: federation: presence resynced: {members} members, "
                "{claims} nicknames, {lost} taken meanwhile",
                members=len(self.state.members),
                claims=len(claims),
                lost=len(lost),
            )
        for index in lost:
            if not 0 <= index < len(claims):
                continue
            key, value = claims[index]
            if self.claims.get(key) != value:
                continue
            del self.claims[key]
            member = self.state.nicks.get(key)
            if member is not None:
                self.stats["lost_claims"] += 1
                self.state.unclaimed(member)

    def apply_snapshot(self, nodes: dict[str, dict[str, str]], asked: int) -> None:
        """
        Every node's members as Redis had them when asked (after C{asked}
        events): nodes gone since time out.
        """
        view: dict[str, dict[str, tuple[str, str]]] = {}
        for node in self.view:
            if self.last_heard.get(node, -1) >= asked:
                view[node] = self.view[node]  # newer than the snapshot
        for node, members in nodes.items():
            if node == self.node or not NODE.fullmatch(node) or node in view:
                continue
            if len(view) >= MAX_NODES:
                break
            entries = view[node] = {}
            for key, value in list(members.items())[: self.max_remote]:
                nick, _, where = value.partition("\t")
                if self._nick(nick) and key == nick.lower() and self._room(where, ""):
                    entries[key] = (nick, where)
        for node in set(self.view) - set(view):
            self._node_gone(node, "timed out from")
        self.view = view

    def _node_gone(self, node: str, how: str) -> None:
        assert self.state is not None
        members = self.view.pop(node, {})
        self.last_heard.pop(node, None)
        log.info(
            "chat: federation: node {node} is gone with {count} members",
            node=node,
            count=len(members),
        )
        for nick, where in members.values():
            if where:
                self.state.relay(
                    where.lower(), f"*** {nick} {how} #{where}\n".encode(), False
                )
        if self.store is not None and self.connected:
            self.store.forget(node)

    # --- events ------------------------------------------------------------

    def _publish(self, event: dict[str, str], history: str = "") -> None:
        """Publish C{event}; kept in C{history}'s room history too if given."""
        if self.store is None or not self.connected:
            self.stats["unsent"] += 1
            return
        event["n"] = self.node
        payload = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        keep = self.history if history else 0
        if not self.store.publish(payload, history, keep):
            self.stats["unsent"] += 1
            return
        self.stats["published"] += 1

    def _event(self, payload: Any) -> dict[str, str] | None:
        """An event from Redis, if it has the right size and form."""
        if isinstance(payload, bytes):
            try:
                payload = payload.decode("utf-8")
            except UnicodeDecodeError:
                return None
        if not isinstance(payload, str) or len(payload) > self.max_event:
            return None
        try:
            event = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(event, dict) or len(event) > 8:
            return None
        if not all(isinstance(v, str) for v in event.values()):
            return None
        if not NODE.fullmatch(event.get("n", "")):
            return None
        return event

    def _nick(self, nick: str) -> bool:
        return len(nick) <= NICK_LIMIT and NICK.fullmatch(nick) is not None

    def _room(self, name: str, empty: str | None = None) -> str | None:
        if name == "" and empty is not None:
            return empty
        return room_name(name)

    def _text(self, text: str) -> str | None:
        if not text or "\n" in text or len(text.encode()) > self.max_message:
            return None
        return clean(text)

    def _render(self, event: dict[str, str]) -> bytes | None:
        """The line a room message or action is shown as, or None if invalid."""
        kind, nick = event.get("k"), event.get("f", "")
        text = self._text(event.get("x", ""))
        if text is None or not self._nick(nick):
            return None
        if kind == "say":
            return f"<{nick}> {text}\n".encode()
        if kind == "me":
            return f"* {nick} {text}\n".encode()
        return None

    def received(self, payload: Any) -> None:
        """One message from the event channel."""
        event = self._event(payload)
        if event is None:
            self.stats["invalid"] += 1
            return
        node = event["n"]
        if node == self.node:
            return
        self.stats["received"] += 1
        self.last_heard[node] = self.heard
        self.heard += 1
        if not self._apply(node, event):
            self.stats["invalid"] += 1

    def _apply(self, node: str, event: dict[str, str]) -> bool:
        assert self.state is not None
        state = self.state
        kind = event.get("k")
        if kind == "gone":
            if node in self.view:
                self._node_gone(node, "quit")
            return True
        nick = event.get("f", "")
        if not self._nick(nick):
            return False
        members = self.view.get(node)
        if members is None:
            if len(self.view) >= MAX_NODES:
                return False
            members = self.view[node] = {}
        if (
            len(members) >= self.max_remote
            and kind in ("enter", "nick", "say", "me")
            and nick.lower() not in members
        ):
            return False  # more than a node can hold: not believed
        if kind == "msg":
            text = self._text(event.get("x", ""))
            if text is None:
                return False
            state.relay_direct(event.get("t", ""), f"[msg] <{nick}> {text}\n".encode())
            return True
        room = self._room(event.get("r", ""), "" if kind == "nick" else None)
        if room is None:
            return False
        key = room.lower()
        if kind in ("say", "me"):
            line = self._render(event)
            if line is None:
                return False
            members[nick.lower()] = (nick, room)  # whoever speaks is there
            state.relay(key, line, True)
        elif kind == "enter":
            members[nick.lower()] = (nick, room)
            state.relay(key, f"*** {nick} joined #{room}\n".encode(), False)
        elif kind == "leave":
            how = event.get("h", "")
            if how not in _HOW:
                return False
            if how == "left":
                members[nick.lower()] = (nick, "")
            else:
                members.pop(nick.lower(), None)
            state.relay(key, f"*** {nick} {how} #{room}\n".encode(), False)
        elif kind == "nick":
            new = event.get("t", "")
            if not self._nick(new):
                return False
            members.pop(nick.lower(), None)
            members[new.lower()] = (new, room)
            if room:
                line = f"*** {nick} is now known as {new}\n".encode()
                state.relay(key, line, False)
        elif kind == "topic":
            text = self._text(event.get("x", ""))
            if text is None:
                return False
            line = f"*** {nick} set the topic of #{room}: {text}\n".encode()
            state.relay_topic(key, text, line)
        else:
            return False
        return True

    def _failed(self, failure: Failure, what: str) -> None:
        # A lost connection is reported by the store itself; just note it.
        log.debug(
            "chat: federation: {what} failed: {error}",
            what=what,
            error=failure.getErrorMessage(),
        )
