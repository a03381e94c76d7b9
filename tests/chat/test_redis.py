"""
The Redis side of federation with no Redis: the start-up link, the store's
connections as they open and close, master discovery through sentinels, and
the Redis settings.
"""

from __future__ import annotations

from typing import Any

import txredisapi  # type: ignore[import-untyped]
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sockd.chat.federation import Federation
from sockd.chat.redis import (
    RedisLink,
    RedisStore,
    RedisURL,
    Sentinels,
    discover,
    parse_url,
    sentinel_manager,
    target,
)
from sockd.core.config import ChatSettings, ConfigError
from tests.chat.test_federation import FakeRedis, Node
from tests.helpers import settings


class StartUpTests(SynchronousTestCase):
    def test_redis_without_url_is_an_error_naming_the_key(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            settings(chat={"backend": "redis"})
        self.assertIn(
            "[chat] backend = redis but redis_url is not set", str(raised.exception)
        )
        with self.assertRaises(ConfigError) as raised:
            settings(chat={"redis_url": "http://127.0.0.1:6379"})
        self.assertIn("redis_url", str(raised.exception))

    def test_url_parts_and_no_password_in_its_text(self) -> None:
        url = parse_url("redis://:s3cret@127.0.0.1:6390/2")
        self.assertEqual(url, RedisURL("127.0.0.1", 6390, "s3cret", 2))
        self.assertNotIn("s3cret", str(url))
        self.assertEqual(parse_url("redis://localhost").port, 6379)

    def link(self, probe: Any) -> tuple[RedisLink, Federation]:
        node = Node(FakeRedis(Clock()), "a")
        store: Any = type("S", (), {"url": RedisURL("127.0.0.1", 1, None, 0)})()
        return RedisLink(node.settings, node.federation, store, probe), node.federation

    def test_no_redis_at_start_stops_start_up_with_a_clear_error(self) -> None:
        def refused(url: RedisURL, prefix: str) -> int:
            raise ConnectionRefusedError(111, "Connection refused")

        link, _ = self.link(refused)
        with self.assertRaises(SystemExit) as raised:
            link.privilegedStartService()
        message = str(raised.exception.code)
        self.assertIn("chat cannot use Redis at redis://127.0.0.1:1/0", message)
        self.assertIn("[chat] redis_url", message)
        self.assertIn("Connection refused", message)

    def test_the_start_up_number_makes_guest_names_unique(self) -> None:
        link, federation = self.link(lambda url, prefix: 71)
        link.privilegedStartService()
        self.assertEqual(federation.guest_name(4), "guest-4-1z")


class FakeConnection:
    """A txredisapi protocol as the store sees it, on a loopback peer."""

    def __init__(self, port: int) -> None:
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", port)
        )
        self.channels: list[str] = []

    def subscribe(self, channels: list[str]) -> Deferred[None]:
        self.channels += channels
        return succeed(None)


SENTINELS = Sentinels((("127.0.0.1", 26379), ("::1", 26380)), "mymaster", "pw", 2)


class MasterSwitchTests(SynchronousTestCase):
    """RedisStore's connections, with no I/O: each one opened and closed."""

    def store(self, url: RedisURL | Sentinels) -> tuple[RedisStore, Federation]:
        node = Node(FakeRedis(Clock()), "a")
        node.federation.down("starting")
        store = RedisStore(url, "test:", "a", node.federation, node.redis.clock)
        return store, node.federation

    def test_both_connections_follow_the_master_together(self) -> None:
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        store, federation = self.store(SENTINELS)
        commands, events = FakeConnection(6379), FakeConnection(6379)
        store.opened("commands", commands)
        self.assertFalse(federation.connected)
        store.opened("events", events)
        self.assertTrue(federation.connected)
        self.assertEqual(events.channels, ["test:events"])
        # The master dies: the commands connection goes first; the events
        # one is closed too, so both ask the sentinels again.
        store.closed("commands", commands)
        self.assertFalse(federation.connected)
        self.assertTrue(events.transport.disconnecting)
        self.assertFalse(commands.transport.disconnecting)
        store.closed("events", events)
        # A server that turned out not to be the master: closed unopened.
        store.closed("events", FakeConnection(6379))
        store.opened("events", FakeConnection(6380))
        self.assertFalse(federation.connected)
        store.opened("commands", FakeConnection(6380))
        self.assertTrue(federation.connected)
        self.assertEqual(store.master, "127.0.0.1:6380")
        lines = [formatEvent(event) for event in logged]
        self.assertIn("chat: redis: master mymaster is at 127.0.0.1:6379", lines)
        self.assertIn(
            "chat: redis: master mymaster is at 127.0.0.1:6380 (was 127.0.0.1:6379)",
            lines,
        )
        self.assertIn(
            "chat: federation: lost Redis (commands connection to master "
            "mymaster at 127.0.0.1:6379 closed); degraded: local delivery only "
            "until it is back",
            lines,
        )

    def test_one_server_loses_only_the_connection_that_broke(self) -> None:
        store, federation = self.store(RedisURL("127.0.0.1", 6379, None, 0))
        commands, events = FakeConnection(6379), FakeConnection(6379)
        store.opened("commands", commands)
        store.opened("events", events)
        self.assertTrue(federation.connected)
        store.closed("events", events)
        self.assertFalse(federation.connected)
        self.assertFalse(commands.transport.disconnecting)
        self.assertIsNone(store.master)


def masters(port: Any = 6380, flags: str = "master", others: int = 2) -> Any:
    """A sentinel's SENTINEL MASTERS, as txredisapi parses it."""
    names = set(flags.split(","))
    return {
        "mymaster": {
            "ip": "127.0.0.1",
            "port": port,
            "flags": flags,
            "is_master": "master" in names,
            "is_sdown": "s_down" in names,
            "is_odown": "o_down" in names,
            "num-other-sentinels": str(others),
        }
    }


class FakeSentinel:
    """A sentinel connection whose answers the test gives."""

    def __init__(self) -> None:
        self.asked: list[Deferred[Any]] = []
        self.withdrawn: list[Deferred[Any]] = []

    def sentinel_masters(self) -> Deferred[Any]:
        self.asked.append(Deferred(self.withdrawn.append))
        return self.asked[-1]


class DiscoveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sentinels = [FakeSentinel() for _ in range(3)]
        self.usable = txredisapi.Sentinel([]).check_master_state

    def discover(self) -> Deferred[tuple[str, int]]:
        return discover(self.sentinels, "mymaster", self.usable, self.clock, 3.0)

    def test_the_first_sentinel_naming_a_usable_master_wins(self) -> None:
        found = self.discover()
        self.sentinels[0].asked[0].callback(masters(6379, "master,s_down"))
        self.assertNoResult(found)
        self.sentinels[1].asked[0].callback(masters(6380))
        self.assertEqual(self.successResultOf(found), ("127.0.0.1", 6380))
        # The third is not waited for: its question is withdrawn.
        self.assertEqual(self.sentinels[2].withdrawn, self.sentinels[2].asked)
        self.assertEqual(self.sentinels[0].withdrawn, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_master_down_everywhere_fails_at_once(self) -> None:
        # As during a failover: txredisapi would wait its whole timeout.
        found = self.discover()
        for sentinel in self.sentinels[:2]:
            sentinel.asked[0].callback(masters(6379, "master,s_down,o_down"))
        self.assertNoResult(found)
        self.sentinels[2].asked[0].errback(txredisapi.ConnectionError("lost"))
        failure = self.failureResultOf(found, txredisapi.MasterNotFoundError)
        self.assertIn("no sentinel names a usable master mymaster", str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answers_not_understood_name_no_master(self) -> None:
        found = self.discover()
        self.sentinels[0].asked[0].callback(["not", "a", "dict"])
        self.sentinels[1].asked[0].callback(masters("not a port"))
        self.sentinels[2].asked[0].callback({"mymaster": {"ip": "127.0.0.1"}})
        self.failureResultOf(found, txredisapi.MasterNotFoundError)

    def test_silence_fails_after_the_timeout(self) -> None:
        found = self.discover()
        self.sentinels[0].asked[0].callback(masters(6379, "master,s_down"))
        self.clock.advance(2.9)
        self.assertNoResult(found)
        self.clock.advance(0.1)
        failure = self.failureResultOf(found, txredisapi.MasterNotFoundError)
        self.assertIn("no sentinel answered within 3s", str(failure.value))
        for sentinel in self.sentinels[1:]:
            self.assertEqual(sentinel.withdrawn, sentinel.asked)

    def test_txredisapi_finds_the_master_this_way(self) -> None:
        manager = sentinel_manager((), self.clock, 3.0)
        manager.min_other_sentinels = 2
        manager.sentinels = self.sentinels[:2]
        found = manager.discover_master("mymaster")
        self.sentinels[0].asked[0].callback(masters(6379, others=1))  # alone
        self.sentinels[1].asked[0].callback(masters(6380, others=2))
        self.assertEqual(self.successResultOf(found), ("127.0.0.1", 6380))


class SentinelSettingsTests(SynchronousTestCase):
    def chat(self, text: str) -> ChatSettings:
        return settings("[chat]\nbackend = redis\n" + text).chat

    def refused(self, text: str) -> str:
        with self.assertRaises(ConfigError) as raised:
            self.chat(text)
        return str(raised.exception)

    def test_sentinels_master_and_the_password_and_database_of_the_url(self) -> None:
        chat = self.chat(
            "redis_sentinels = 10.0.0.1:26379 sentinel-2.example:26380\n"
            "  [::1]:26381\n"
            "redis_master = my-master.1\n"
            "redis_url = redis://:s%40cret@/2\n"
        )
        self.assertEqual(
            chat.redis_sentinels,
            (("10.0.0.1", 26379), ("sentinel-2.example", 26380), ("::1", 26381)),
        )
        where = target(chat)
        self.assertEqual(
            where,
            Sentinels(chat.redis_sentinels, "my-master.1", "s@cret", 2),
        )
        self.assertEqual(
            str(where),
            "master my-master.1 via sentinels 10.0.0.1:26379 "
            "sentinel-2.example:26380 [::1]:26381",
        )
        self.assertEqual(
            where.at("10.0.0.9", 6379), RedisURL("10.0.0.9", 6379, "s@cret", 2)
        )
        bare = target(self.chat("redis_sentinels = h:1\nredis_master = m\n"))
        self.assertEqual(bare, Sentinels((("h", 1),), "m", None, 0))
        self.assertEqual(
            target(self.chat("redis_url = redis://h:7/1\n")), parse_url("redis://h:7/1")
        )

    def test_bad_sentinel_addresses_say_what_is_allowed(self) -> None:
        allowed = "expected up to 16 sentinel addresses HOST:PORT separated by spaces"
        for value, why in [
            ("10.0.0.1", "'10.0.0.1' is not HOST:PORT"),
            ("::1:26379", "'::1:26379' is not HOST:PORT"),
            ("[nope]:26379", "'[nope]:26379' is not HOST:PORT"),
            ("-h:26379", "'-h:26379' is not HOST:PORT"),
            ("h:0", "'h:0' has no port from 1 to 65535"),
            ("h:65536", "'h:65536' has no port from 1 to 65535"),
            ("h:port", "'h:port' has no port from 1 to 65535"),
            ("h:1 h:1", "'h:1' is listed twice"),
            (" ".join(f"h:{port}" for port in range(1, 18)), allowed),
        ]:
            message = self.refused(f"redis_master = m\nredis_sentinels = {value}\n")
            self.assertIn("<test>, line 4: [chat] redis_sentinels = ", message)
            self.assertIn(why, message)
            self.assertIn(allowed, message)
        message = self.refused("redis_sentinels = h:1\nredis_master = no spaces\n")
        self.assertIn(
            "line 4: [chat] redis_master = 'no spaces': expected a master", message
        )

    def test_sentinels_need_the_master_name(self) -> None:
        self.assertEqual(
            self.refused("redis_sentinels = h:26379\n"),
            "<test>, line 3: [chat] redis_sentinels is set but redis_master is "
            "not; expected the name the sentinels monitor the master by "
            "(sentinel monitor NAME ...)",
        )

    def test_a_master_name_needs_sentinels(self) -> None:
        message = self.refused("redis_url = redis://h\nredis_master = m\n")
        self.assertIn("<test>, line 4: [chat] redis_master is set but", message)

    def test_with_sentinels_the_url_names_no_host(self) -> None:
        message = self.refused(
            "redis_sentinels = h:26379\nredis_master = m\n"
            "redis_url = redis://:pw@10.0.0.1:6379/0\n"
        )
        self.assertIn("<test>, line 5: [chat] redis_url names a host", message)
        self.assertIn("expected redis://[:PASSWORD@]/DB, or nothing", message)
        self.assertNotIn("pw", message)

    def test_a_url_without_host_is_only_for_sentinels(self) -> None:
        message = self.refused("redis_url = redis://:pw@/1\n")
        self.assertIn("<test>, line 3: [chat] redis_url has no host", message)
        self.assertIn("redis_url", self.refused("redis_url = redis://:6379/0\n"))
