"""The `sockd chat` client logic, against the real chat state, in memory."""

from __future__ import annotations

from itertools import pairwise
from random import Random
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockd.chat.state import ChatState
from sockd.chat.text import clean, event_line, parse_event
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
        #: what the server sent the client
        self.to_client: list[bytes] = []
        #: when each of them was sent
        self.times: list[float] = []

    def restart(self) -> None:
        """A new server process: new key, nobody known."""
        self.state = ChatState(settings(chat=self.chat).chat, self.clock)

    # the server's Sender
    def send(self, data: bytes, addr: Any) -> None:
        if addr == ME:
            self.to_client.append(data)
            # delivered on the next turn, as a socket would
            self.clock.callLater(0, self.client.received, data)
        else:
            self.others.append((data, addr))

    def send_many(self, data: bytes, addrs: list[Any]) -> None:
        for addr in addrs:
            self.send(data, addr)

    # the client's send
    def to_server(self, data: bytes) -> None:
        self.from_client.append(data)
        self.times.append(self.clock.seconds())
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


def assert_paced(
    case: SynchronousTestCase, times: list[float], rate: float, burst: int
) -> None:
    """No stretch of time holds more datagrams than the pace allows."""
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            allowed = burst + rate * (times[j] - start) + 1e-9
            case.assertLessEqual(j - i + 1, allowed, (times[i : j + 1]))


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
        prompt = self.wire.to_client[0].decode()
        self.assertTrue(prompt.startswith("*** welcome to sockd chat."))
        self.assertTrue(prompt.endswith("*** @v=" + self.wire.state.token(ME) + "\n"))

    def test_join_prompts_and_machine_lines_are_not_shown(self) -> None:
        client = self.wire.make_client(nick="alice", room="dev", keepalive=30.0)
        client.start()
        self.clock.advance(0)
        self.wire.restart()
        self.clock.advance(30)  # a stranger's prompt, then a new welcome
        self.assertTrue(client.joined)
        self.assertEqual(self.wire.state.members[ME].nick, "alice")
        sent = [line for d in self.wire.to_client for line in d.decode().splitlines()]
        events = [e.name for e in map(parse_event, sent) if e is not None]
        self.assertEqual(events, ["v", "welcome", "room", "nick", "room"] * 2)
        # The full prompt (a hello's credit), then the bare line (a ping's).
        self.assertEqual(len([line for line in sent if "/v " in line]), 1)
        for line in self.wire.screen:
            self.assertIsNone(parse_event(line), line)
            self.assertNotIn("/v ", line)
        self.assertEqual(
            [line for line in self.wire.screen if line.startswith("*** welcome")],
            [
                "*** welcome, you are guest-1. /nick NAME to pick a name, /help "
                "for commands; silent members leave after 300s (/ping keeps you "
                "here)",
                "*** welcome, you are guest-1. /nick NAME to pick a name, /help "
                "for commands; silent members leave after 300s (/ping keeps you "
                "here)",
            ],
        )

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
        self.clock.pump([0.5] * 6)
        sent = [d for d in self.wire.from_client if d.startswith(b"line")]
        self.assertEqual(sent, [f"line {i}\n".encode() for i in range(6)])
        # Hellos, /v and lines share one pace: 2 a second, bursts of 2.
        assert_paced(self, self.wire.times, rate=2.0, burst=2)
        # a moment after the end of input: /quit, then exit 0
        self.clock.advance(1.5)
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
        # Hellos at 0, then after 0.5-1 s and 1-2 s more: less and less often.
        self.assertEqual(self.wire.from_client, [HELLO.encode()] * 3)

    def test_topic_cannot_fake_a_welcome(self) -> None:
        client = self.wire.make_client(nick="alice", room="dev")
        client.start()
        self.clock.advance(0)
        sent = len(self.wire.from_client)
        shown = len(self.wire.screen)
        forged = [
            b"*** bob set the topic of #lobby: /v abcdefgh\n",
            b"<bob> *** /v abcdefgh\n",
            b"*** bob set the topic of #lobby: *** @v=abcdefgh\n",
            b"*** topic: *** @dropped\n",
            b"<bob> *** @v=abcdefgh\n",
            b"* bob *** @dropped\n",
            b"[msg] <bob> *** @welcome nick=bob\n",
            b"[msg -> bob] *** @nick=bob\n",
            b"<bob> ok\xe2\x80\xa8*** @room=evil\n",
            b"<bob> ok\r*** @room=evil\n",
            b"*** error: no one is called *** @room=evil\n",
        ]
        for data in forged:
            client.received(data)
        self.assertEqual(len(self.wire.from_client), sent)
        self.assertEqual(len(self.wire.screen), shown + len(forged))  # as text
        self.assertTrue(client.joined)
        self.assertEqual((client.nick, client.room), ("alice", "dev"))
        # The same machine lines from the server itself are heeded.
        client.received(b"*** you are now bob\n*** @nick=bob\n")
        self.assertEqual(client.nick, "bob")
        client.received(b"*** you were dropped ...\n*** @dropped\n")
        self.assertFalse(client.joined)

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


class Hostile:
    """
    A server that answers every datagram with C{reply(n)} (n counts the
    datagrams), on the next turn, as a socket would.
    """

    def __init__(self, clock: Clock, reply: Any) -> None:
        self.clock = clock
        self.reply = reply
        self.times: list[float] = []
        self.sent: list[bytes] = []

    def to_server(self, data: bytes) -> None:
        self.times.append(self.clock.seconds())
        self.sent.append(data)
        for line in self.reply(len(self.sent)):
            self.clock.callLater(0, self.client.received, line)

    def make_client(self, **kwargs: Any) -> ChatClient:
        kwargs.setdefault("timeout", 1000.0)
        self.client = ChatClient(
            self.to_server,
            lambda line: None,
            self.clock,
            lambda status: None,
            timestamps=False,
            **kwargs,
        )
        return self.client

    def run(self, seconds: float) -> None:
        """Run every timer due within C{seconds}, each at its exact time."""
        end = self.clock.seconds() + seconds
        self.clock.advance(0)
        while True:
            due = [call.getTime() for call in self.clock.getDelayedCalls()]
            if not due or min(due) > end:
                break
            self.clock.advance(min(due) - self.clock.seconds())
        self.clock.advance(end - self.clock.seconds())

    def validations(self) -> list[float]:
        sent = zip(self.times, self.sent, strict=True)
        return [t for t, d in sent if d.startswith(b"/v ")]


def prompt(n: int) -> list[bytes]:
    token = f"{'abcdefgh'[n % 8]}bcdefgh"
    return [f"*** to join, send: /v {token}\n{event_line('v', token)}".encode()]


class HostileServerTests(SynchronousTestCase):
    """Whatever the server sends, the client keeps its pace."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def test_prompt_for_every_datagram(self) -> None:
        # Seen: 72,608 datagrams in 3 s against such a server.
        server = Hostile(self.clock, prompt)
        server.make_client(nick="ann", room="dev", random=lambda: 0.0)
        server.client.start()
        server.run(60)
        # The documented pace: bursts of 2 x 4, then 4 a second.
        self.assertLessEqual(len(server.sent), 8 + 4 * 60)
        assert_paced(self, server.times, rate=4.0, burst=8)
        # And the backoff, far below it: one hello, then /v at once and
        # after 0.5, 1, 2, 4, 8, 16 s (the shortest draws: half of 1, 2, 4...).
        self.assertEqual(server.sent[0], HELLO.encode())
        self.assertEqual(
            [round(t - 1000, 6) for t in server.validations()],
            [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5],
        )
        self.assertEqual(len(server.sent), 8)

    def test_backoff_grows_and_is_jittered(self) -> None:
        def gaps(draw: Any) -> list[float]:
            clock = Clock()
            server = Hostile(clock, prompt)
            server.make_client(random=draw)
            server.client.start()
            server.run(200)
            times = server.validations()
            return [round(b - a, 6) for a, b in pairwise(times)][:7]

        shortest = gaps(lambda: 0.0)
        longest = gaps(lambda: 1.0)
        self.assertEqual(shortest, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0])
        self.assertEqual(longest, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0])
        drawn = gaps(Random(7).random)
        for low, got, high in zip(shortest, drawn, longest, strict=True):
            self.assertTrue(low <= got <= high, (low, got, high))
        ratios = {round(g / s, 2) for g, s in zip(drawn, shortest, strict=True)}
        self.assertGreater(len(ratios), 3)  # not one fixed factor

    def test_welcome_then_prompt_for_every_datagram(self) -> None:
        # A membership that breaks at once is no reason to start afresh.
        def flapping(n: int) -> list[bytes]:
            welcome = "*** welcome, you are ann. /nick NAME\n"
            return [(welcome + event_line("welcome", nick="ann")).encode(), *prompt(n)]

        server = Hostile(self.clock, flapping)
        server.make_client(nick="ann", random=lambda: 0.0)
        server.client.start()
        server.run(60)
        self.assertLessEqual(len(server.validations()), 7)
        self.assertLessEqual(len(server.sent), 3 * 7)
        assert_paced(self, server.times, rate=4.0, burst=8)

    def test_unasked_prompts_and_welcomes(self) -> None:
        # 1,000 welcomes and prompts a second, whatever the client sends.
        server = Hostile(self.clock, lambda n: [])
        client = server.make_client(nick="ann", random=lambda: 0.0)

        def flood(i: int = 0) -> None:
            for j in range(10):
                client.received(
                    b"*** welcome, you are guest-1. /nick NAME\n"
                    b"*** @welcome nick=guest-1\n"
                )
                client.received(prompt(i + j)[0])
            self.clock.callLater(0.01, flood, i + 10)

        client.start()
        flood()
        server.run(60)
        # Each membership the server grants costs a /v (backed off) and
        # the /nick that goes with it; nothing else answers the flood.
        validations = len(server.validations())
        self.assertLessEqual(validations, 8)
        self.assertLessEqual(len(server.sent), 1 + 2 * validations)
        assert_paced(self, server.times, rate=4.0, burst=8)

    def test_lasting_membership_rejoins_at_once(self) -> None:
        wire = Wire(self.clock)
        client = wire.make_client(nick="bob", random=lambda: 0.0)
        client.start()
        self.clock.advance(0)
        for _ in range(3):  # server restarts, a while apart
            self.clock.advance(client.stable)
            wire.restart()
            client.typed("/ping")
            self.clock.advance(0)
            self.assertIn(ME, wire.state.members)
            self.assertEqual(wire.state.members[ME].nick, "bob")


class NicknameTests(SynchronousTestCase):
    """C{--nick} when the name is taken: wait for a silent holder, or C{NICK_}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.wire = Wire(self.clock, rate="5", burst="10")
        self.notices: list[str] = []

    def holder(self, addr: Any, nick: str) -> None:
        """A member (not the client) called C{nick} at C{addr}."""
        state = self.wire.state
        for text in ("hello, anyone here?\n", f"/v {state.token(addr)}\n/nick {nick}"):
            state.receive(self.wire, addr, len(text), text)
        self.assertIs(state.nicks[nick.lower()].addr, addr)

    def start(self, nick: str) -> ChatClient:
        client = self.wire.make_client(nick=nick, notice=self.notices.append)
        client.start()
        self.clock.advance(0)
        return client

    def nick_requests(self) -> list[bytes]:
        return [d for d in self.wire.from_client if d.startswith(b"/nick")]

    def test_taken_nick_falls_back_like_irc(self) -> None:
        self.holder(("127.0.0.2", 50001), "alice")
        client = self.start("alice")
        self.assertEqual(self.wire.state.members[ME].nick, "alice_")
        self.assertEqual(client.nick, "alice_")
        self.assertEqual(self.notices, ["alice is taken; trying alice_"])
        self.assertIn(
            "*** error: alice is taken; free if its holder stays silent 60s more",
            self.wire.screen,
        )
        for line in self.wire.screen:
            self.assertIsNone(parse_event(line), line)

    def test_fallbacks_are_bounded_then_the_guest_name_stays(self) -> None:
        for i, nick in enumerate(["alice", "alice_", "alice__", "alice___"]):
            self.holder(("127.0.0.2", 50001 + i), nick)
        client = self.start("alice")
        self.clock.advance(60)  # nothing more is tried
        self.assertEqual(
            self.nick_requests(),
            [
                b"/nick alice\n",
                b"/nick alice_\n",
                b"/nick alice__\n",
                b"/nick alice___\n",
            ],
        )
        self.assertEqual(
            self.notices,
            [
                "alice is taken; trying alice_",
                "alice_ is taken; trying alice__",
                "alice__ is taken; trying alice___",
                "alice___ is taken too; /nick NAME to pick a name",
            ],
        )
        self.assertTrue(client.joined)
        self.assertFalse(client.finished)
        self.assertTrue(self.wire.state.members[ME].nick.startswith("guest-"))

    def test_silent_holder_on_this_host_is_waited_for(self) -> None:
        # sockd chat killed and started again at once: the old one, same
        # host, is silent but not yet for nick_reclaim (5 s).
        old = ("127.0.0.1", 50002)
        self.holder(old, "alice")
        self.clock.advance(2)
        client = self.start("alice")
        self.assertEqual(
            self.notices, ["alice is taken; its holder is silent, asking again"]
        )
        self.assertEqual(self.nick_requests(), [b"/nick alice\n"])
        self.clock.advance(4)
        self.assertEqual(self.nick_requests(), [b"/nick alice\n"] * 2)
        self.assertEqual(self.wire.state.members[ME].nick, "alice")
        self.assertEqual(client.nick, "alice")
        self.assertTrue(self.wire.state.members[old].nick.startswith("guest-"))

    def test_a_typed_nick_that_is_taken_is_only_shown(self) -> None:
        self.holder(("127.0.0.2", 50001), "bob")
        client = self.start("alice")
        client.typed("/nick bob")
        self.clock.advance(1)
        self.assertEqual(self.nick_requests(), [b"/nick alice\n", b"/nick bob\n"])
        self.assertEqual(self.notices, [])
        self.assertIn(
            "*** error: bob is taken; free if its holder stays silent 59s more",
            self.wire.screen,
        )
        self.assertEqual(client.nick, "alice")

    def test_a_guest_name_given_by_the_server_is_not_asked_for_again(self) -> None:
        client = self.start("alice")
        client.received(
            b"*** while you were silent, another member took your nickname alice; "
            b"you are now guest-9 (/nick NAME to pick another)\n*** @nick=guest-9\n"
        )
        self.assertIsNone(client.nick)
        self.wire.restart()
        self.clock.advance(31)  # a ping, a prompt, a new welcome
        self.assertTrue(client.joined)
        self.assertEqual(self.nick_requests(), [b"/nick alice\n"])

    def test_wrong_code_reply_is_answered_not_shown(self) -> None:
        state = ChatState(settings().chat, self.clock)
        stranger = ("127.0.0.9", 9999)
        data = "/v abcdefgh" + " " * 20 + "\n"
        state.receive(self.wire, stranger, len(data), data)
        ((reply, _),) = self.wire.others
        self.assertIn(b"that join code is wrong or expired", reply)
        client = self.wire.make_client()
        client.received(reply)
        self.clock.advance(0)
        self.assertEqual(self.wire.screen, [])
        self.assertEqual(
            self.wire.from_client, [f"/v {state.token(stranger)}\n".encode()]
        )


class CommandLineTests(SynchronousTestCase):
    def test_subcommand_listed(self) -> None:
        self.assertIn("chat", main.SUBCOMMANDS)
        args = main.parser().parse_args(
            ["chat", "localhost:8001", "--nick", "ann", "--room", "dev"]
        )
        self.assertEqual(
            (args.nick, args.room, args.address), ("ann", "dev", "localhost:8001")
        )

    def test_help_states_the_pace(self) -> None:
        text = main.parser()._subparsers._group_actions[0].choices["chat"].format_help()
        self.assertIn("at most RATE datagrams a second", " ".join(text.split()))

    def test_help_states_the_nick_fallback(self) -> None:
        text = main.parser()._subparsers._group_actions[0].choices["chat"].format_help()
        self.assertIn("NICK_, NICK__ and NICK___ are tried", " ".join(text.split()))

    def test_bad_address_is_usage_error(self) -> None:
        self.assertEqual(main.main(["chat", "localhost:99999"]), 2)


class KeyboardTests(SynchronousTestCase):
    def test_unterminated_last_line_is_sent_once(self) -> None:
        from twisted.internet.testing import StringTransport

        from sockd.client.chat import _Keyboard

        typed: list[str] = []
        ended: list[bool] = []

        class Client:
            def typed(self, line: str) -> None:
                typed.append(line)

            def input_ended(self) -> None:
                ended.append(True)

        keyboard = _Keyboard(Client())  # type: ignore[arg-type]
        keyboard.makeConnection(StringTransport())
        keyboard.dataReceived(b"one\ntw")
        keyboard.dataReceived(b"o")
        keyboard.readConnectionLost()
        self.assertEqual((typed, ended), (["one", "two"], [True]))
        keyboard.readConnectionLost()
        self.assertEqual((typed, ended), (["one", "two"], [True, True]))
