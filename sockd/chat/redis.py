"""
The Redis side of chat federation (L{sockd.chat.federation}).

 - L{RedisStore} is the federation's L{sockd.chat.federation.Store} over
   txredisapi: one connection for commands, one subscribed to the event
   channel, each reconnected with backoff; with Redis Sentinel
   (L{Sentinels}), both follow the master the sentinels name, and an outage
   while they move is the same as any other.
 - L{check} is the blocking start-up probe: no Redis, no node; L{RedisLink}
   runs it before anything is bound.
 - L{federate} makes a L{sockd.chat.state.ChatState} a node of the cluster.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockd.chat.federation import NODE, Federation
from sockd.chat.state import ChatState
from sockd.core.config import ChatSettings
from sockd.core.interfaces import IDaemonReactor
from sockd.core.logs import escape

__all__ = [
    "RedisLink",
    "RedisStore",
    "RedisURL",
    "Sentinels",
    "check",
    "discover",
    "federate",
    "find_master",
    "node_name",
    "parse_url",
    "sentinel_manager",
    "target",
]

log = Logger(namespace="sockd.chat")


@dataclass(frozen=True)
class RedisURL:
    host: str
    port: int
    password: str | None
    db: int

    def __str__(self) -> str:  # never the password
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_url(url: str) -> RedisURL:
    """C{redis://[:PASSWORD@]HOST[:PORT][/DB]}, already checked by the config."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.strip("/")
    return RedisURL(
        parts.hostname or "127.0.0.1",
        parts.port or 6379,
        urllib.parse.unquote(parts.password) if parts.password else None,
        int(path) if path else 0,
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Sentinels:
    """A master found through Redis Sentinel, and how to use it."""

    addresses: tuple[tuple[str, int], ...]
    master: str
    password: str | None
    db: int

    def __str__(self) -> str:  # never the password
        where = " ".join(_address(host, port) for host, port in self.addresses)
        return f"master {self.master} via sentinels {where}"

    def at(self, host: str, port: int) -> RedisURL:
        """The master, once a sentinel said where it is."""
        return RedisURL(host, port, self.password, self.db)


def target(settings: ChatSettings) -> RedisURL | Sentinels:
    """Where C{settings} say Redis is: one server, or a master via sentinels."""
    url = parse_url(settings.redis_url)
    if not settings.redis_sentinels:
        return url
    return Sentinels(
        settings.redis_sentinels, settings.redis_master, url.password, url.db
    )


def _command(*words: str | int) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = str(word).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _line(reader: Any) -> str:
    line: bytes = reader.readline(512)
    if not line.endswith(b"\r\n"):
        raise ValueError("the connection closed or sent a line too long")
    return line[:-2].decode("utf-8", "replace")


def _ask_sentinel(host: str, port: int, master: str, timeout: float) -> RedisURL:
    """One sentinel's answer to C{SENTINEL GET-MASTER-ADDR-BY-NAME}."""
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        sock.makefile("rb") as reader,
    ):
        sock.sendall(_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", master))
        head = _line(reader)
        if head.startswith("-"):
            raise ValueError(f"refused: {escape(head[1:])}")
        if head in ("*-1", "_"):
            raise ValueError(f"monitors no master called {master}")
        if head != "*2":
            raise ValueError(f"unexpected reply {escape(head[:40])}")
        words = []
        for _ in range(2):
            size = _line(reader)
            if not (
                size.startswith("$") and size[1:].isdigit() and int(size[1:]) < 256
            ):
                raise ValueError(f"unexpected reply {escape(size[:40])}")
            words.append(_line(reader))
        found, number = words
        if not (number.isdigit() and 0 < int(number) < 65536):
            raise ValueError(f"unexpected port {escape(number[:40])}")
        return RedisURL(found, int(number), None, 0)


def find_master(sentinels: Sentinels, timeout: float = 3.0) -> RedisURL:
    """
    Blocking: the master's address from the first sentinel that gives it.
    Raises L{ValueError} naming every sentinel and why none did.
    """
    failures = []
    for host, port in sentinels.addresses:
        try:
            found = _ask_sentinel(host, port, sentinels.master, timeout)
        except (OSError, ValueError) as e:
            failures.append(f"{_address(host, port)}: {e}")
            continue
        return sentinels.at(found.host, found.port)
    raise ValueError(
        f"no sentinel gave the address of master {sentinels.master}: "
        + "; ".join(failures)
    )


def check(url: RedisURL | Sentinels, prefix: str, timeout: float = 3.0) -> int:
    """
    Blocking, at start-up only: can Redis be reached and used (through the
    sentinels: the master they name)?  Returns a number unique to this
    start (guest names are made with it).  Raises L{OSError} or
    L{ValueError} saying what failed.
    """
    if isinstance(url, Sentinels):
        master = find_master(url, timeout)
        try:
            return check(master, prefix, timeout)
        except (OSError, ValueError) as e:
            where = _address(master.host, master.port)
            raise ValueError(f"master {url.master} at {where}: {e}") from None
    with (
        socket.create_connection((url.host, url.port), timeout=timeout) as sock,
        sock.makefile("rb") as reader,
    ):
        words: list[tuple[str | int, ...]] = []
        if url.password is not None:
            words.append(("AUTH", url.password))
        if url.db:
            words.append(("SELECT", url.db))
        words.append(("INCR", prefix + "seq"))
        for command in words:
            sock.sendall(_command(*command))
            reply = reader.readline(512).rstrip(b"\r\n").decode("utf-8", "replace")
            if not reply or reply[0] == "-":
                raise ValueError(f"{command[0]} refused: {escape(reply[1:] or 'EOF')}")
        return int(reply[1:])


#: renew this node's presence (its hash, rebuilt) and its nickname claims,
#: taking back the ones that expired meanwhile; answers the (0-based)
#: indexes of the claims now held by someone else
_HEARTBEAT = """
local ttl = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
redis.call('del', KEYS[1])
redis.call('hset', KEYS[1], '.', '1')
for i = 1, n do
  redis.call('hset', KEYS[1], ARGV[2 + 2 * i], ARGV[3 + 2 * i])
end
redis.call('pexpire', KEYS[1], ttl)
redis.call('sadd', KEYS[2], ARGV[2])
local lost = {}
local base = 2 + 2 * n
for i = 3, #KEYS do
  local want = ARGV[base + i - 1]
  local have = redis.call('get', KEYS[i])
  if have == false or have == want then
    redis.call('set', KEYS[i], want, 'PX', ttl)
  else
    table.insert(lost, i - 3)
  end
end
return lost
"""

#: publish a room message and keep it in the room's history
_SAY = """
redis.call('publish', ARGV[1], ARGV[2])
redis.call('rpush', KEYS[1], ARGV[2])
redis.call('ltrim', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('pexpire', KEYS[1], ARGV[4])
return 1
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

#: how long room history and topics outlive their last write, in ms
ROOM_TTL = 86_400_000


class RedisStore(Service):
    """
    L{Store} over txredisapi: a command connection and a subscriber
    connection, each reconnected with backoff (0.5 s doubling to 5 s; through
    sentinels, at once then doubling to 1 s, asking them where the master is
    before each attempt).  The federation is told L{Federation.up} when both
    work and L{Federation.down} when either is lost.
    """

    reply_timeout = 5.0
    connect_timeout = 3.0
    max_delay = 5.0
    #: through sentinels: the longest wait between two attempts to reach the
    #: master (txredisapi uses it as the connect timeout too)
    sentinel_max_delay = 1.0
    #: commands sent and not yet answered before room traffic is shed
    max_in_flight = 5000

    def __init__(
        self,
        url: RedisURL | Sentinels,
        prefix: str,
        node: str,
        federation: Federation,
        reactor: IDaemonReactor,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.node = node
        self.federation = federation
        self.reactor = reactor
        self.channel = prefix + "events"
        self._up = {"commands": False, "events": False}
        #: the connection of each kind while it is open
        self._open: dict[str, Any] = {}
        #: where the master was last found (through sentinels)
        self.master: str | None = None
        self.in_flight = 0
        self._commands: Any = None
        self._events: Any = None
        self._sentinels: Any = None
        self.setName("chat redis")

    # --- connections ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        import txredisapi  # type: ignore[import-untyped]

        store = self

        class Events(txredisapi.SubscriberProtocol):  # type: ignore[misc]
            def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
                store.federation.received(message)

        options: dict[str, Any] = {
            "isLazy": True,
            "password": self.url.password,
            "convertNumbers": False,  # a topic "42" stays text
        }
        if isinstance(self.url, Sentinels):

            class MasterEvents(txredisapi.SentinelRedisProtocol, Events):  # type: ignore[misc]
                """Subscribed on the master only (its role is checked first)."""

            base = _watched(txredisapi.SentinelConnectionFactory, self)
            self._sentinels = sentinel_manager(
                self.url.addresses, self.reactor, self.connect_timeout
            )
            # master_for connects at once, so the backoff is set on the class.
            base.maxDelay = self.sentinel_max_delay
            base.factor = 2.0
            commands = self._sentinels.master_for(
                self.url.master,
                factory_class=type("Commands", (base,), {"which": "commands"}),
                dbid=self.url.db or None,
                replyTimeout=self.reply_timeout,
                **options,
            )._factory
            events = self._sentinels.master_for(
                self.url.master,
                factory_class=type(
                    "EventFactory",
                    (base,),
                    {"which": "events", "protocol": MasterEvents},
                ),
                replyTimeout=None,
                **options,
            )._factory
            self._commands, self._events = commands, events
            return

        from twisted.internet.endpoints import HostnameEndpoint

        url = self.url
        base = _watched(txredisapi.RedisFactory, self)
        commands = type("Commands", (base,), {"which": "commands"})(
            str(url), url.db or None, 1, replyTimeout=self.reply_timeout, **options
        )
        events = type("EventFactory", (base,), {"which": "events", "protocol": Events})(
            None, None, 1, replyTimeout=None, **options
        )
        for factory in (commands, events):
            factory.maxDelay = self.max_delay
            factory.initialDelay = 0.5
            factory.factor = 2.0
            factory.reconnect = True
            factory.startConnecting(
                HostnameEndpoint(self.reactor, url.host, url.port, self.connect_timeout)
            )
        self._commands, self._events = commands, events

    def opened(self, which: str, protocol: Any) -> None:
        """A connection is ready: subscribe, or note that commands can flow."""
        self._open[which] = protocol
        if isinstance(self.url, Sentinels):
            peer = protocol.transport.getPeer()
            where = _address(peer.host, peer.port)
            if where != self.master:
                log.info(
                    "chat: redis: master {master} is at {where}{was}",
                    master=self.url.master,
                    where=where,
                    was=f" (was {self.master})" if self.master else "",
                )
                self.master = where
        if which == "events":
            subscribed = protocol.subscribe([self.channel])
            subscribed.addCallback(lambda _: self._changed("events", True))
            subscribed.addErrback(self._failed, "subscribe")
            return
        # Small commands one after another: Nagle would hold each back
        # until the previous one is acknowledged (up to 40 ms).
        nodelay = getattr(protocol.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            nodelay(True)
        self._changed("commands", True)

    def closed(self, which: str, protocol: Any) -> None:
        """A connection is gone; through sentinels, the other one goes too."""
        if self._open.get(which) is not protocol:
            return  # never ready, or already replaced
        del self._open[which]
        self._changed(which, False)
        if isinstance(self.url, Sentinels):
            # Both ask the sentinels again, so they cannot end up on two
            # different servers after a failover.
            for other in list(self._open.values()):
                other.transport.loseConnection()

    def _where(self) -> str:
        if isinstance(self.url, Sentinels):
            return f"master {self.url.master} at {self.master or '?'}"
        return str(self.url)

    def _changed(self, which: str, up: bool) -> None:
        was = all(self._up.values())
        self._up[which] = up
        now = all(self._up.values())
        if now and not was:
            self.federation.up()
        elif was and not now:
            self.federation.down(f"{which} connection to {self._where()} closed")
        elif not up and which == "commands" and not any(self._up.values()):
            self.federation.down(f"cannot reach {self._where()}")

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        factories = [
            f for f in (self._commands, self._events, self._sentinels) if f is not None
        ]
        if not factories:
            return None
        from twisted.internet.defer import gatherResults

        # The last commands (leaving the cluster) are answered first, so
        # they are not cut off; PING is answered after them.
        last = self._run("PING", "PING") if self._up["commands"] else _done(None)
        self._commands = self._events = self._sentinels = None
        last.addErrback(lambda _: None)
        last.addTimeout(self.reply_timeout, self.reactor)
        last.addErrback(lambda _: None)

        def disconnect(_: Any) -> Deferred[Any]:
            return gatherResults(
                [f.disconnect() for f in factories], consumeErrors=True
            )

        return last.addCallback(disconnect)

    def _failed(self, failure: Failure, what: str) -> None:
        log.debug(
            "chat: redis: {what} failed: {error}",
            what=what,
            error=failure.getErrorMessage(),
        )

    def _run(self, what: str, *words: Any) -> Deferred[Any]:
        assert self._commands is not None
        result: Deferred[Any] = self._commands.handler.execute_command(*words)
        self.in_flight += 1
        return result.addBoth(self._answered)

    def _answered(self, result: Any) -> Any:
        self.in_flight -= 1
        return result

    def _fire(self, *words: Any) -> None:
        if self._commands is None:
            return
        self._run(str(words[0]), *words).addErrback(self._failed, str(words[0]))

    # --- Store ---------------------------------------------------------------

    def publish(self, payload: str, room: str = "", keep: int = 0) -> bool:
        if self.in_flight >= self.max_in_flight:
            return False  # Redis or the link is behind: shed, do not queue
        if room and keep:
            # One round trip for the event and the room's history.
            key = f"{self.prefix}hist:{room}"
            self._fire("EVAL", _SAY, 1, key, self.channel, payload, keep, ROOM_TTL)
        else:
            self._fire("PUBLISH", self.channel, payload)
        return True

    def member(self, key: str, value: str | None) -> None:
        node = f"{self.prefix}node:{self.node}"
        if value is None:
            self._fire("HDEL", node, key)
        else:
            # PEXPIRE too: a hash recreated here must not outlive the node.
            self._fire("HSET", node, key, value)
            self._fire("PEXPIRE", node, int(self.federation.ttl * 1000))

    def claim(self, key: str, value: str, ttl: float) -> Deferred[bool]:
        result = self._run(
            "claim",
            "SET",
            f"{self.prefix}nick:{key}",
            value,
            "NX",
            "PX",
            int(ttl * 1000),
        )
        return result.addCallback(lambda reply: reply == "OK")

    def release(self, key: str, value: str) -> None:
        self._fire("EVAL", _RELEASE, 1, f"{self.prefix}nick:{key}", value)

    def heartbeat(
        self, members: dict[str, str], claims: list[tuple[str, str]], ttl: float
    ) -> Deferred[list[int]]:
        keys = [f"{self.prefix}node:{self.node}", f"{self.prefix}nodes"]
        keys += [f"{self.prefix}nick:{key}" for key, _ in claims]
        args: list[Any] = [int(ttl * 1000), self.node, len(members)]
        for field, value in members.items():
            args += [field, value]
        args += [value for _, value in claims]
        result = self._run("heartbeat", "EVAL", _HEARTBEAT, len(keys), *keys, *args)

        def lost(reply: Any) -> list[int]:
            if not isinstance(reply, list):
                return []
            return [i for i in reply if isinstance(i, int)]

        return result.addCallback(lost)

    def snapshot(self) -> Deferred[dict[str, dict[str, str]]]:
        from twisted.internet.defer import gatherResults

        def each(names: Any) -> Deferred[dict[str, dict[str, str]]]:
            nodes = [
                n
                for n in (names if isinstance(names, (list, set)) else [])
                if isinstance(n, str) and NODE.fullmatch(n)
            ]
            reads = [
                self._run("HGETALL", "HGETALL", f"{self.prefix}node:{n}") for n in nodes
            ]

            def combine(hashes: list[Any]) -> dict[str, dict[str, str]]:
                found: dict[str, dict[str, str]] = {}
                for node, fields in zip(nodes, hashes, strict=True):
                    if not fields:  # expired: a node that died unheard of
                        self._fire("SREM", f"{self.prefix}nodes", node)
                    if isinstance(fields, list) and fields:
                        pairs = zip(fields[::2], fields[1::2], strict=False)
                        found[node] = {
                            k: v
                            for k, v in pairs
                            if isinstance(k, str) and isinstance(v, str)
                        }
                return found

            return gatherResults(reads, consumeErrors=True).addCallback(combine)

        return self._run("SMEMBERS", "SMEMBERS", f"{self.prefix}nodes").addCallback(
            each
        )

    def forget(self, node: str) -> None:
        self._fire("DEL", f"{self.prefix}node:{node}")
        self._fire("SREM", f"{self.prefix}nodes", node)

    def set_topic(self, room: str, topic: str) -> None:
        self._fire("SET", f"{self.prefix}topic:{room}", topic, "PX", ROOM_TTL)

    def recall(self, room: str, keep: int) -> Deferred[tuple[str, list[str]]]:
        from twisted.internet.defer import gatherResults

        reads = [
            self._run("GET", "GET", f"{self.prefix}topic:{room}"),
            self._run("LRANGE", "LRANGE", f"{self.prefix}hist:{room}", -keep, -1)
            if keep
            else _done([]),
        ]

        def combine(replies: list[Any]) -> tuple[str, list[str]]:
            topic, lines = replies
            return (
                topic if isinstance(topic, str) else "",
                [
                    x
                    for x in (lines if isinstance(lines, list) else [])
                    if isinstance(x, str)
                ],
            )

        return gatherResults(reads, consumeErrors=True).addCallback(combine)


def _watched(base: Any, store: RedisStore) -> Any:
    """A txredisapi factory class telling C{store} of its connections."""

    class Watched(base):  # type: ignore[misc]
        which = ""

        def buildProtocol(self, addr: IAddress) -> Any:
            protocol = super().buildProtocol(addr)
            protocol.whenConnected().addCallback(
                lambda _: store.opened(self.which, protocol)
            )
            protocol.whenDisconnected().addCallback(
                lambda _: store.closed(self.which, protocol)
            )
            return protocol

    return Watched


def discover(
    sentinels: list[Any],
    master: str,
    usable: Callable[[dict[str, Any]], bool],
    clock: IReactorTime,
    timeout: float,
) -> Deferred[tuple[str, int]]:
    """
    The master's address from the first sentinel that names it usable
    (C{SENTINEL MASTERS}); fails once every sentinel has answered without
    one (as during a failover), or after C{timeout}.
    """
    from txredisapi import MasterNotFoundError

    result: Deferred[tuple[str, int]] = Deferred()
    asks = [sentinel.sentinel_masters() for sentinel in sentinels]
    answers = 0

    def answered(masters: Any) -> None:
        nonlocal answers
        answers += 1
        if result.called:
            return
        state: Any = masters.get(master) if isinstance(masters, dict) else None
        found = None
        if isinstance(state, dict):
            try:
                if usable(state):
                    found = (str(state["ip"]), int(state["port"]))
            except (KeyError, TypeError, ValueError):
                pass  # not the answer of a sentinel we understand
        if found is not None:
            result.callback(found)
        elif answers == len(asks):
            result.errback(
                MasterNotFoundError(f"no sentinel names a usable master {master}")
            )

    def expired() -> None:
        if not result.called:
            result.errback(
                MasterNotFoundError(f"no sentinel answered within {timeout:g}s")
            )

    timer = clock.callLater(timeout, expired)

    def done(outcome: Any) -> Any:
        if timer.active():
            timer.cancel()
        for ask in asks:
            # One waiting for a sentinel that is down would be sent when
            # it is back, for nothing.
            ask.cancel()
        return outcome

    for ask in asks:
        ask.addCallbacks(answered, lambda _: answered(None))
    if not asks:
        expired()
    return result.addBoth(done)


def sentinel_manager(
    addresses: tuple[tuple[str, int], ...], clock: IReactorTime, timeout: float
) -> Any:
    """
    txredisapi's L{Sentinel} over connections to C{addresses}, finding the
    master with L{discover}: its own waits its whole timeout (10 s) when
    every sentinel says the master is down, as they do while they fail over.
    """
    import txredisapi

    class Sentinel(txredisapi.Sentinel):  # type: ignore[misc]
        def discover_master(self, service_name: str) -> Deferred[tuple[str, int]]:
            return discover(
                self.sentinels, service_name, self.check_master_state, clock, timeout
            )

    return Sentinel(addresses, connectTimeout=timeout, replyTimeout=timeout)


def _done(value: Any) -> Deferred[Any]:
    from twisted.internet.defer import succeed

    return succeed(value)


def node_name(configured: str) -> str:
    """The configured name, or host name and process id."""
    if configured:
        return configured
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:48] or "node"
    return f"{host}-{os.getpid()}"


class RedisLink(Service):
    """
    Start-up for a federated node: Redis must answer before anything is
    bound (else a clear error and exit status 1); then the store connects.
    """

    def __init__(
        self,
        settings: ChatSettings,
        federation: Federation,
        store: RedisStore,
        probe: Callable[[RedisURL | Sentinels, str], int] = check,
    ) -> None:
        self.settings = settings
        self.federation = federation
        self.store = store
        self.probe = probe
        self.setName("chat redis link")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        url = self.store.url
        try:
            import txredisapi  # noqa: F401
        except ImportError:
            raise SystemExit(
                "sockd: [chat] backend = redis needs txredisapi: "
                "pip install 'sockd[redis]'"
            ) from None
        try:
            number = self.probe(url, self.settings.redis_prefix)
        except (OSError, ValueError) as e:
            if isinstance(url, Sentinels):
                where = f"{url} ([chat] redis_sentinels, redis_master)"
            else:
                where = f"at {url} ([chat] redis_url)"
            raise SystemExit(f"sockd: chat cannot use Redis {where}: {e}") from None
        self.federation.tag = _base36(number)
        log.info(
            "chat: federation: node {node} on Redis {where}",
            node=self.federation.node,
            where=str(url) if isinstance(url, Sentinels) else f"at {url}",
        )

    def startService(self) -> None:
        super().startService()
        self.federation.startService()
        self.store.startService()

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        self.federation.stopService()
        return self.store.stopService()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    number = abs(number)
    while True:
        number, digit = divmod(number, 36)
        out = digits[digit] + out
        if not number:
            return out


def federate(
    state: ChatState, settings: ChatSettings, reactor: IDaemonReactor
) -> RedisLink:
    """Make C{state} a node of the cluster on the Redis C{settings} name."""
    node = node_name(settings.node_name)
    federation = Federation(settings, node, "0", reactor)
    store = RedisStore(
        target(settings), settings.redis_prefix, node, federation, reactor
    )
    federation.attach(state, store)
    return RedisLink(settings, federation, store)
