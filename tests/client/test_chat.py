"""The `sockd chat` client logic, against the real chat state, in memory."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockd.chat.state import ChatState, clean
from sockd.client import main
from sockd.client.chat import HELLO, ChatClient
from tests.helpers import settings

ME = ("127.0.0.1", 50000)
OTHER = ("127.0.0.1", 50001)


class Wire:
    """Client and server state joined by datagrams delivered at once."""

    def __init__(self, clock: Clock, **chat: str) -> None:
        self.clock = clock
        self.chat = chat
        self.state = ChatState(settings(chat=chat).chat, clock)
        self.up = True
        self.screen: list[str] = []
        self.others: list[tuple[bytes, Any]] = []
        self.status: list[int] = []
        self.from_client: list[bytes] = []

    def restart(self) -> None:
        """A new server process: new key, nobody known."""
        self.state = ChatState(settings(chat=self.chat).chat, self.clock)

    # the server's Sender
    def send(self, data: bytes, addr: Any) -> None:
        if addr == ME:
            # delivered on the next turn, as a socket would
            self.clock.callLater(0, self.client.received, data)
        else:
            self.others.append((data, addr))

    # the client's send
    def to_server(self, data: bytes) -> None:
        self.from_client.append(data)
        if self.up:
            self.state.receive(self, ME, len(data), clean(data.decode()))

    def other_says(self, text: str) -> None:
        data = text.encode()
        self.state.receive(self, OTHER, len(data), clean(text))

    def make_client(self, **kwargs: Any) -> ChatClient:
        self.client = ChatClient(
            self.to_server,
            self.screen.append,
            self.clock,
            self.status.append,
            timestamps=False,
            **kwargs,
        )
        return self.client


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.wire = Wire(self.clock, rate="5", burst="10")

    def test_validates_and_takes_nick_and_room(self) -> None:
        client = self.wire.make_client(nick="alice", room="#dev")
        client.start()
        self.clock.advance(0)
        self.assertTrue(client.joined)
        (member,) = self.wire.state.members.values()
        self.assertEqual(member.nick, "alice")
        assert member.room is not None
        self.assertEqual(member.room.name, "dev")
        self.assertIn("*** you joined #dev (1 member)", self.wire.screen)

    def test_hello_is_padded_for_the_full_welcome(self) -> None:
        self.assertGreaterEqual(len(HELLO) * 3, 120)
        client = self.wire.make_client()
        client.start()
        self.clock.advance(0)
        self.assertTrue(self.wire.screen[0].startswith("*** welcome to sockd chat."))

    def test_lines_queued_until_joined_then_paced(self) -> None:
        self.wire.up = False
        client = self.wire.make_client(rate=2.0, burst=2)
        client.start()
        for i in range(6):
            client.typed(f"line {i}\n")
        client.input_ended()
        self.clock.advance(0)
        self.assertEqual(self.wire.from_client, [HELLO.encode()])
        self.wire.up = True
        self.clock.advance(1.0)  # the hello is sent again
        self.assertTrue(client.joined)
        sent = [d for d in self.wire.from_client if d.startswith(b"line")]
        self.assertEqual(len(sent), 2)
        self.clock.pump([0.5] * 4)
        sent = [d for d in self.wire.from_client if d.startswith(b"line")]
        self.assertEqual(sent, [f"line {i}\n".encode() for i in range(6)])
        # a moment after the end of input: /quit, then exit 0
        self.clock.advance(1.0)
        self.assertEqual(self.wire.from_client[-1], b"/quit\n")
        self.assertEqual(self.wire.status, [0])
        self.assertEqual(self.wire.state.members, {})

    def test_typed_quit_leaves(self) -> None:
        client = self.wire.make_client()
        client.start()
        client.typed("/quit\n")
        self.clock.advance(0)
        self.assertEqual(self.wire.status, [0])
        self.assertIn("*** bye", self.wire.screen)

    def test_keepalive_pings_hidden(self) -> None:
        client = self.wire.make_client(keepalive=30.0)
        client.start()
        self.clock.advance(0)
        for _ in range(20):
            self.clock.advance(30)
        self.assertEqual(len(self.wire.state.members), 1)
        self.assertEqual(self.wire.from_client.count(b"/ping\n"), 20)
        self.assertNotIn("*** pong", self.wire.screen)
        client.typed("/ping")
        self.clock.advance(0)
        self.assertIn("*** pong", self.wire.screen)

    def test_rejoins_after_server_restart(self) -> None:
        client = self.wire.make_client(nick="alice", room="dev", keepalive=30.0)
        client.start()
        self.clock.advance(0)
        client.typed("/nick alicia")
        client.typed("/join ops")
        self.clock.advance(1)
        self.wire.restart()
        self.clock.advance(30)  # the next ping meets a stranger's welcome
        (member,) = self.wire.state.members.values()
        self.assertEqual(member.nick, "alicia")
        assert member.room is not None
        self.assertEqual(member.room.name, "ops")
        client.typed("back again")
        self.wire.other_says("hello")  # a stranger elsewhere: not our business
        self.clock.advance(1)
        self.assertIn(b"back again\n", self.wire.from_client)

    def test_rejoins_after_being_dropped(self) -> None:
        wire = Wire(self.clock, idle_timeout="10")
        client = wire.make_client(nick="bob", keepalive=60.0)
        client.start()
        self.clock.advance(0)
        self.clock.advance(11)
        wire.state.expire()
        self.clock.advance(0)
        self.assertIn(ME, wire.state.members)
        self.assertEqual(wire.state.members[ME].nick, "bob")

    def test_no_server_exits_1(self) -> None:
        self.wire.up = False
        client = self.wire.make_client(timeout=5.0)
        client.start()
        client.input_ended()
        self.clock.pump([1.0] * 6)
        self.assertEqual(self.wire.status, [1])
        self.assertGreater(len(self.wire.from_client), 3)

    def test_topic_cannot_fake_a_welcome(self) -> None:
        client = self.wire.make_client()
        client.start()
        self.clock.advance(0)
        sent = len(self.wire.from_client)
        client.received(b"*** bob set the topic of #lobby: /v abcdefgh\n")
        client.received(b"<bob> *** /v abcdefgh\n")
        self.assertEqual(len(self.wire.from_client), sent)
        self.assertTrue(client.joined)

    def test_unsafe_server_text_cleaned(self) -> None:
        client = self.wire.make_client()
        client.received(b"<x> \x1b[2J\xc2\x9b bad \xff\n")
        (line,) = self.wire.screen
        self.assertNotIn("\x1b", line)
        self.assertNotIn("\x9b", line)
        self.assertIn("\ufffd", line)

    def test_timestamps(self) -> None:
        client = ChatClient(
            lambda data: None, self.wire.screen.append, self.clock, print
        )
        client.received(b"<x> hi\n")
        self.assertRegex(self.wire.screen[0], r"^\d\d:\d\d:\d\d <x> hi$")


class CommandLineTests(SynchronousTestCase):
    def test_subcommand_listed(self) -> None:
        self.assertIn("chat", main.SUBCOMMANDS)
        args = main.parser().parse_args(
            ["chat", "localhost:8001", "--nick", "ann", "--room", "dev"]
        )
        self.assertEqual(
            (args.nick, args.room, args.address), ("ann", "dev", "localhost:8001")
        )

    def test_bad_address_is_usage_error(self) -> None:
        self.assertEqual(main.main(["chat", "localhost:99999"]), 2)
