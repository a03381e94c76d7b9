"""
Chat federation with no Redis and no I/O: two or three L{ChatState}s, each
with its L{Federation}, over an in-memory store that keeps Redis's rules
(atomic claims, expiry by the clock, one event channel).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockd.chat.federation import Federation
from sockd.chat.protocol import ChatProtocol
from sockd.chat.state import Backend, ChatState
from sockd.chat.text import parse_event
from sockd.core.config import ChatSettings
from tests.chat.test_state import Recorder, say
from tests.helpers import FakeDatagramTransport, settings

A1 = ("127.0.0.1", 41001)
A2 = ("127.0.0.1", 41002)
B1 = ("127.0.0.1", 42001)
B2 = ("127.0.0.1", 42002)
TTL = 3.0


class FakeRedis:
    """The little of Redis the store uses; keys expire by the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[Any, float | None]] = {}
        self.queue: list[str] = []
        self.subscribers: list[Federation] = []
        self.full = False

    def get(self, key: str) -> Any:
        value, deadline = self.data.get(key, (None, None))
        if deadline is not None and self.clock.seconds() >= deadline:
            del self.data[key]
            return None
        return value

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        deadline = None if ttl is None else self.clock.seconds() + ttl
        self.data[key] = (value, deadline)

    def expire(self, key: str, ttl: float) -> None:
        value = self.get(key)
        if value is not None:
            self.set(key, value, ttl)

    def flush(self) -> None:
        """Deliver every published event, in order, to every subscriber."""
        for _ in range(10_000):
            if not self.queue:
                return
            payload = self.queue.pop(0)
            for federation in list(self.subscribers):
                if federation.connected:  # else its connection is down too
                    federation.received(payload)
        raise AssertionError("events kept coming")


class FakeStore:
    """L{sockd.chat.federation.Store} on a L{FakeRedis}; answers at once."""

    def __init__(self, redis: FakeRedis, node: str) -> None:
        self.redis = redis
        self.node = node

    def publish(self, payload: str, room: str = "", keep: int = 0) -> bool:
        if self.redis.full:
            return False
        self.redis.queue.append(payload)
        if room and keep:
            lines = (self.redis.get(f"hist:{room}") or []) + [payload]
            self.redis.set(f"hist:{room}", lines[-keep:])
        return True

    def member(self, key: str, value: str | None) -> None:
        members = self.redis.get(f"node:{self.node}") or {}
        if value is None:
            members.pop(key, None)
        else:
            members[key] = value
        self.redis.set(f"node:{self.node}", members, TTL)

    def claim(self, key: str, value: str, ttl: float) -> Deferred[bool]:
        if self.redis.get(f"nick:{key}") is not None:
            return succeed(False)
        self.redis.set(f"nick:{key}", value, ttl)
        return succeed(True)

    def release(self, key: str, value: str) -> None:
        if self.redis.get(f"nick:{key}") == value:
            del self.redis.data[f"nick:{key}"]

    def heartbeat(
        self, members: dict[str, str], claims: list[tuple[str, str]], ttl: float
    ) -> Deferred[list[int]]:
        self.redis.set(f"node:{self.node}", {".": "1", **members}, ttl)
        nodes = self.redis.get("nodes") or set()
        self.redis.set("nodes", nodes | {self.node})
        lost = []
        for i, (key, value) in enumerate(claims):
            have = self.redis.get(f"nick:{key}")
            if have is None or have == value:
                self.redis.set(f"nick:{key}", value, ttl)
            else:
                lost.append(i)
        return succeed(lost)

    def snapshot(self) -> Deferred[dict[str, dict[str, str]]]:
        found = {}
        for node in self.redis.get("nodes") or set():
            members = self.redis.get(f"node:{node}")
            if members:
                found[node] = dict(members)
        return succeed(found)

    def forget(self, node: str) -> None:
        self.redis.data.pop(f"node:{node}", None)
        self.redis.set("nodes", (self.redis.get("nodes") or set()) - {node})

    def set_topic(self, room: str, topic: str) -> None:
        self.redis.set(f"topic:{room}", topic)

    def recall(self, room: str, keep: int) -> Deferred[tuple[str, list[str]]]:
        lines = self.redis.get(f"hist:{room}") or []
        return succeed((self.redis.get(f"topic:{room}") or "", lines[-keep:]))


def chat_settings(**chat: str) -> ChatSettings:
    base = {
        "validation": "false",
        "rate": "1000",
        "burst": "1000",
        "backend": "redis",
        "redis_url": "redis://127.0.0.1:1",
        "presence_timeout": str(TTL),
    }
    return settings(chat={**base, **chat}).chat


class Node:
    def __init__(self, redis: FakeRedis, name: str, **chat: str) -> None:
        self.settings = chat_settings(**chat)
        self.state = ChatState(self.settings, redis.clock, key=b"k" * 32)
        self.federation = Federation(self.settings, name, name, redis.clock)
        self.store = FakeStore(redis, name)
        self.federation.attach(self.state, self.store)  # type: ignore[arg-type]
        self.out = Recorder()
        self.redis = redis
        redis.subscribers.append(self.federation)
        self.federation.startService()
        self.federation.up()

    def join(self, addr: Any, nick: str) -> None:
        say(self.state, self.out, addr, "/hello")
        say(self.state, self.out, addr, f"/nick {nick}")
        assert self.out.take(addr)[-1] == f"*** you are now {nick}\n*** @nick={nick}\n"
        self.redis.flush()

    def say(self, addr: Any, text: str) -> None:
        say(self.state, self.out, addr, text)
        self.redis.flush()

    def take(self, addr: Any) -> list[str]:
        return self.out.take(addr)

    def kill(self) -> None:
        """Gone without a word: no more beats, no more events."""
        self.redis.subscribers.remove(self.federation)
        assert self.federation._beat is not None
        self.federation._beat.stop()


class Cluster(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.redis = FakeRedis(self.clock)
        self.a = Node(self.redis, "a")
        self.b = Node(self.redis, "b")
        self.a.join(A1, "ann")
        self.b.join(B1, "bob")
        for addr, node in ((A1, self.a), (B1, self.b)):
            node.take(addr)

    def tick(self, seconds: float) -> None:
        """Let time pass in beats, delivering events as they come."""
        for _ in range(int(seconds)):
            self.clock.advance(1.0)
            self.redis.flush()


class AcrossNodesTests(Cluster):
    def test_room_messages_and_actions_cross(self) -> None:
        self.a.say(A1, "hello")
        self.assertEqual(self.b.take(B1), ["<ann> hello\n"])
        self.b.say(B1, "/me waves")
        self.assertEqual(self.a.take(A1), ["* bob waves\n"])
        # Each node keeps the room's history, whoever said it.
        self.assertEqual(
            list(self.a.state.rooms["lobby"].history),
            [b"<ann> hello\n", b"* bob waves\n"],
        )
        self.assertEqual(self.b.take(B1), [])  # never your own line back

    def test_join_leave_and_rename_notices_cross(self) -> None:
        self.b.say(B1, "/join dev")
        self.assertEqual(self.a.take(A1), ["*** bob left #lobby\n"])
        self.b.say(B1, "/join lobby")
        self.assertEqual(self.a.take(A1), ["*** bob joined #lobby\n"])
        self.b.say(B1, "/nick bobby")
        self.assertEqual(self.a.take(A1), ["*** bob is now known as bobby\n"])
        self.b.say(B1, "/quit")
        self.assertEqual(self.a.take(A1), ["*** bobby quit #lobby\n"])
        self.a.say(A1, "/who")
        self.assertEqual(self.a.take(A1), ["*** #lobby (1): ann\n"])

    def test_direct_messages_cross_with_the_canonical_name(self) -> None:
        self.a.say(A1, "/msg BOB psst")
        self.assertEqual(self.a.take(A1), ["[msg -> bob] psst\n"])
        self.assertEqual(self.b.take(B1), ["[msg] <ann> psst\n"])
        self.a.say(A1, "/msg nobody1 hi")
        self.assertEqual(self.a.take(A1), ["*** error: no one is called nobody1\n"])

    def test_who_and_rooms_show_the_cluster(self) -> None:
        self.b.join(B2, "bea")
        self.b.say(B2, "/join dev")
        self.a.take(A1)
        self.a.say(A1, "/who")
        (who,) = self.a.take(A1)
        self.assertTrue(who.startswith("*** #lobby (2): "), who)
        self.assertEqual(sorted(who.split(": ")[1].strip().split(", ")), ["ann", "bob"])
        self.a.say(A1, "/rooms")
        self.assertEqual(self.a.take(A1), ["*** 2 rooms: #lobby (2), #dev (1)\n"])

    def test_topic_crosses_and_a_new_room_gets_the_cluster_history(self) -> None:
        self.b.say(B1, "/join dev")
        self.b.say(B1, "/topic plans")
        self.b.say(B1, "first")
        self.b.say(B1, "second")
        self.a.take(A1)
        self.a.say(A1, "/join dev")
        self.assertEqual(
            self.a.take(A1),
            [
                "*** you joined #dev (1 member)\n*** @room=dev\n",
                "*** topic: plans\n",
                "*** last 2 messages in #dev:\n",
                "<bob> first\n",
                "<bob> second\n",
            ],
        )
        self.assertEqual(self.b.take(B1)[-1], "*** ann joined #dev\n")
        self.b.say(B1, "/topic later")
        self.assertEqual(self.a.take(A1), ["*** bob set the topic of #dev: later\n"])
        self.assertEqual(self.a.state.rooms["dev"].topic, "later")

    def test_guest_names_carry_the_node_tag(self) -> None:
        say(self.a.state, self.a.out, A2, "/hello")
        self.assertIn("you are guest-2-a.", self.a.take(A2)[0])


class NicknameTests(Cluster):
    def test_nicknames_are_unique_across_the_cluster_ignoring_case(self) -> None:
        self.b.join(B2, "bea")
        self.b.say(B2, "/nick ANN")
        self.assertEqual(self.b.take(B2), ["*** error: ANN is taken\n*** @taken=ANN\n"])
        self.assertEqual(self.b.state.members[B2].nick, "bea")

    def test_a_silent_holder_here_gives_its_name_back_cluster_wide(self) -> None:
        self.tick(6)  # ann is silent past nick_reclaim (5 s)
        self.a.say(A2, "/hello")  # ann's host, a new port
        self.a.say(A2, "/nick ann")
        self.assertEqual(self.a.take(A2)[-1], "*** you are now ann\n*** @nick=ann\n")
        old = self.a.state.members[A1]
        self.assertTrue(old.nick.startswith("guest-"))
        self.assertEqual(self.redis.get("nick:ann"), "a\tann")
        self.tick(4)  # claims renewed; the other node sees one ann
        self.assertEqual(self.a.federation.claims, {"ann": "a\tann"})
        self.assertEqual(self.b.federation.view["a"]["ann"], ("ann", "lobby"))
        self.assertEqual(self.b.federation.view["a"][old.key], (old.nick, "lobby"))

    def test_a_silent_holder_elsewhere_keeps_its_name(self) -> None:
        # Only the holder's node sees its silence: another node refuses.
        self.tick(100)
        self.b.say(B2, "/hello")
        self.b.say(B2, "/nick ann")
        self.assertEqual(
            self.b.take(B2)[-1], "*** error: ann is taken\n*** @taken=ann\n"
        )

    def test_a_claim_in_redis_alone_is_enough_to_refuse(self) -> None:
        # Claimed by a node this one has not heard of yet.
        self.redis.set("nick:zed", "c\tzed", TTL)
        self.a.say(A1, "/nick zed")
        self.assertEqual(self.a.take(A1), ["*** error: zed is taken\n*** @taken=zed\n"])

    def test_a_name_given_up_can_be_taken_elsewhere(self) -> None:
        self.a.say(A1, "/nick anna")
        self.assertIsNone(self.redis.get("nick:ann"))
        self.b.take(B1)
        self.b.say(B1, "/nick ann")
        self.assertEqual(self.b.take(B1), ["*** you are now ann\n*** @nick=ann\n"])
        self.b.say(B1, "/quit")
        self.assertIsNone(self.redis.get("nick:ann"))

    def test_claims_are_renewed_while_the_member_is_here(self) -> None:
        self.tick(10)  # three presence timeouts
        self.assertEqual(self.redis.get("nick:ann"), "a\tann")

    def test_case_change_keeps_the_claim(self) -> None:
        self.a.say(A1, "/nick Ann")
        self.assertEqual(self.a.take(A1), ["*** you are now Ann\n*** @nick=Ann\n"])
        self.assertEqual(self.b.take(B1), ["*** ann is now known as Ann\n"])
        self.tick(5)
        self.assertEqual(self.redis.get("nick:ann"), "a\tann")


class NodeLossTests(Cluster):
    def test_a_dead_node_times_out_and_nothing_else_breaks(self) -> None:
        self.a.join(A2, "amy")
        self.a.take(A1)
        self.b.kill()
        self.tick(5)  # past the presence timeout, with a beat after it
        self.assertEqual(self.a.take(A1), ["*** bob timed out from #lobby\n"])
        self.assertEqual(self.a.take(A2), ["*** bob timed out from #lobby\n"])
        self.a.say(A1, "still here")
        self.assertEqual(self.a.take(A2), ["<ann> still here\n"])
        self.a.say(A2, "/nick bob")  # its claim expired with it
        self.assertEqual(self.a.take(A2), ["*** you are now bob\n*** @nick=bob\n"])
        self.assertNotIn("b", self.redis.get("nodes"))

    def test_a_silent_member_times_out_everywhere(self) -> None:
        self.b.state.idle_timeout = 2.0
        self.a.state.idle_timeout = 60.0
        self.tick(3)  # node b keeps beating; bob says nothing
        self.b.state.expire()
        self.redis.flush()
        self.assertEqual(self.a.take(A1), ["*** bob timed out from #lobby\n"])
        self.assertIsNone(self.redis.get("nick:bob"))
        self.assertEqual(self.a.federation.who("lobby"), [])

    def test_a_node_that_stops_says_so_at_once(self) -> None:
        self.b.federation.stopService()
        self.redis.flush()
        self.assertEqual(self.a.take(A1), ["*** bob quit #lobby\n"])
        self.assertIsNone(self.redis.get("nick:bob"))
        self.assertIsNone(self.redis.get("node:b"))

    def test_a_snapshot_older_than_an_event_does_not_undo_it(self) -> None:
        asked = self.a.federation.heard
        self.b.say(B1, "/join dev")  # heard after the snapshot was asked
        self.a.federation.apply_snapshot({"b": {"bob": "bob\tlobby"}}, asked)
        self.assertEqual(self.a.federation.who("dev"), ["bob"])


class DegradedTests(Cluster):
    def test_local_delivery_goes_on_without_redis(self) -> None:
        self.a.join(A2, "amy")
        self.a.take(A1)
        self.b.take(B1)
        self.a.federation.down("test")
        self.b.federation.down("test")
        self.a.say(A1, "local only")
        self.assertEqual(self.a.take(A2), ["<ann> local only\n"])
        self.assertEqual(self.b.take(B1), [])
        self.assertEqual(self.redis.queue, [])
        self.a.say(A2, "/nick amelia")
        (line,) = self.a.take(A2)
        self.assertIn("back in touch with the cluster", line)
        self.a.say(A1, "/msg bob hi")  # elsewhere: cannot be reached now
        self.assertEqual(self.a.take(A1), ["*** error: no one is called bob\n"])
        samples = {(n, v) for n, _, _, v in self.a.federation.metrics()}
        self.assertIn(("chat_redis_connected", 0.0), samples)
        self.assertIn(("chat_redis_outages_total", 1), samples)
        self.assertIn(("chat_redis_unsent_total", 1), samples)

    def test_room_traffic_is_shed_when_redis_falls_behind(self) -> None:
        self.redis.full = True
        self.a.say(A1, "too much")
        self.assertEqual(self.b.take(B1), [])
        self.assertEqual(self.a.federation.stats["unsent"], 1)
        self.redis.full = False
        self.a.say(A1, "again")
        self.assertEqual(self.b.take(B1), ["<ann> again\n"])

    def test_resync_takes_back_presence_and_renames_a_lost_nickname(self) -> None:
        self.a.federation.down("test")
        self.b.federation.down("test")
        self.redis.data.clear()  # a Redis restarted empty
        self.b.federation.up()  # b is back first, and someone takes "ann"
        self.b.join(B2, "ann")
        self.a.federation.up()
        self.redis.flush()
        self.assertEqual(
            self.a.take(A1),
            [
                "*** ann was taken on another node while this one was cut off; "
                "/nick NAME to pick another\n",
                "*** you are now guest-2-a\n*** @nick=guest-2-a\n",
            ],
        )
        self.assertEqual(self.redis.get("nick:bob"), "b\tbob")
        self.assertIn("guest-2-a", self.redis.get("node:a"))
        self.tick(1)
        self.b.take(B1)
        self.b.say(B1, "/who")
        (who,) = self.b.take(B1)
        self.assertIn("guest-2-a", who)


class UntrustedRedisTests(Cluster):
    def event(self, **fields: Any) -> str:
        return json.dumps({"n": "b", "k": "say", "r": "lobby", "f": "bob", **fields})

    def deliver(self, payload: Any) -> list[str]:
        self.a.federation.received(payload)
        return self.a.take(A1)

    def test_text_is_made_safe_again(self) -> None:
        self.assertEqual(
            self.deliver(self.event(x="\x1b[31mred\u202e\xc2\x9b")),
            ["<bob> \ufffd[31mred\ufffd\xc2\ufffd\n"],
        )

    def test_malformed_events_are_dropped_and_counted(self) -> None:
        bad = [
            b"\xff\xfe",
            "not json",
            "[1, 2]",
            self.event(x="x" * 2000),  # longer than max_message
            self.event(x="two\nlines"),
            self.event(x=""),
            self.event(x=5),
            self.event(f="*** server", x="hi"),
            self.event(f="b" * 65, x="hi"),
            self.event(r="no room", x="hi"),
            self.event(k="enter", r="../x"),
            self.event(k="leave", h="exploded"),
            self.event(k="nick", t="not a nick"),
            self.event(k="launch", x="hi"),
            self.event(n="bad node!", x="hi"),
            "x" * 100_000,
        ]
        for payload in bad:
            self.assertEqual(self.deliver(payload), [], payload)
        self.assertEqual(self.a.federation.stats["invalid"], len(bad))

    def test_the_view_of_another_node_is_bounded(self) -> None:
        federation = self.a.federation
        federation.max_remote = 3  # bob and two more
        for name in ("cy", "di", "ed"):
            self.deliver(self.event(k="enter", f=name))
        self.assertEqual(sorted(federation.view["b"]), ["bob", "cy", "di"])
        self.assertEqual(federation.stats["invalid"], 1)

    def test_a_reload_applies_to_what_is_accepted(self) -> None:
        self.a.state.reconfigure(chat_settings(max_message="32"), 32)
        self.assertEqual(self.deliver(self.event(x="y" * 33)), [])
        self.assertEqual(self.deliver(self.event(x="y" * 32)), [f"<bob> {'y' * 32}\n"])

    def test_no_event_from_another_node_passes_for_a_machine_line(self) -> None:
        hostile = "*** @v=abcdefgh"
        lines = []
        for event in [
            self.event(x=hostile),
            self.event(k="me", x=hostile),
            self.event(x=f"ok\r{hostile}"),
            self.event(x=f"ok\r\n{hostile}"),
            self.event(k="topic", x=hostile),
            self.event(k="msg", t="ann", x=hostile),
            self.event(k="enter", f="@v"),
            self.event(k="nick", t="x", f="*** @dropped"),
        ]:
            lines += [
                line for data in self.deliver(event) for line in data.splitlines()
            ]
        self.assertEqual(len(lines), 5)  # CRLF and the bad names: dropped
        for line in lines:
            self.assertIsNone(parse_event(line), line)

    def test_own_events_are_ignored(self) -> None:
        self.assertEqual(self.deliver(self.event(n="a", x="echo")), [])

    def test_a_snapshot_keeps_only_well_formed_members(self) -> None:
        self.a.federation.apply_snapshot(
            {
                "b": {
                    ".": "1",
                    "bob": "bob\tlobby",
                    "eve": "mallory\tlobby",  # key and name disagree
                    "x y": "x y\tlobby",
                    "kim": "kim\t#no way",
                },
                "bad node!": {"zed": "zed\tlobby"},
            },
            self.a.federation.heard,
        )
        self.assertEqual(self.a.federation.view, {"b": {"bob": ("bob", "lobby")}})


class WiringTests(SynchronousTestCase):
    def test_local_is_the_default_and_stays_out_of_the_hot_path(self) -> None:
        state = ChatState(settings().chat, Clock())
        self.assertEqual(type(state.backend), Backend)
        self.assertFalse(state._federated)
        self.assertEqual(settings().chat.backend, "local")

    def test_metrics_include_the_federation(self) -> None:
        node = Node(FakeRedis(Clock()), "a")
        protocol = ChatProtocol(node.state)
        protocol.makeConnection(FakeDatagramTransport())  # type: ignore[arg-type]
        names = {name for name, _, _, _ in protocol.metrics()}
        self.assertLessEqual(
            {
                "chat_redis_connected",
                "chat_remote_members",
                "chat_redis_published_total",
            },
            names,
        )


class FailoverTests(Cluster):
    """Sentinel promotes a replica: every node moves to it and resyncs."""

    def promote(self) -> FakeRedis:
        """The replica as it is now: what is written later never reaches it."""
        replica = FakeRedis(self.clock)
        replica.data = copy.deepcopy(self.redis.data)
        return replica

    def lose_master(self) -> None:
        self.a.federation.down("master lost")
        self.b.federation.down("master lost")

    def move(self, node: Node, replica: FakeRedis) -> None:
        """Both connections of C{node} are on the new master."""
        node.redis.subscribers.remove(node.federation)
        node.store.redis = node.redis = replica
        replica.subscribers.append(node.federation)
        node.federation.up()
        replica.flush()

    def test_members_keep_chatting_and_nicknames_stay_unique(self) -> None:
        replica = self.promote()
        self.a.join(A2, "amy")  # acknowledged by the old master only
        self.b.take(B1)
        self.lose_master()
        self.move(self.a, replica)
        self.move(self.b, replica)
        self.redis = replica
        # Node a took its members' names back on the new master.
        self.assertEqual(replica.get("nick:amy"), "a\tamy")
        self.assertEqual(replica.get("nick:ann"), "a\tann")
        self.b.say(B1, "/nick AMY")
        self.assertEqual(self.b.take(B1), ["*** error: AMY is taken\n*** @taken=AMY\n"])
        self.a.say(A1, "still here")
        self.assertEqual(self.b.take(B1), ["<ann> still here\n"])
        self.b.say(B1, "/who")
        (who,) = self.b.take(B1)
        self.assertEqual(who, "*** #lobby (3): bob, ann, amy\n")

    def test_a_name_lost_in_the_switch_ends_with_one_owner(self) -> None:
        replica = self.promote()
        self.a.join(A2, "amy")  # never replicated
        self.lose_master()
        self.move(self.b, replica)  # b is back first and gives the name away
        self.b.join(B2, "amy")
        self.move(self.a, replica)
        self.redis = replica
        self.assertEqual(
            self.a.take(A2)[-2:],
            [
                "*** amy was taken on another node while this one was cut off; "
                "/nick NAME to pick another\n",
                "*** you are now guest-3-a\n*** @nick=guest-3-a\n",
            ],
        )
        self.assertEqual(replica.get("nick:amy"), "b\tamy")
        self.assertEqual(self.a.state.members[A2].nick, "guest-3-a")
