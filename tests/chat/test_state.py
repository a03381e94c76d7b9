"""The chat state, with no I/O: a recording sender and a task.Clock."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockd.chat.state import AMPLIFICATION, EPOCH, ChatState, FairShare
from sockd.chat.text import Event, clean, parse_event
from sockd.core.limits import TokenBucket
from tests.helpers import settings

A = ("127.0.0.1", 40001)
B = ("127.0.0.1", 40002)
C = ("127.0.0.1", 40003)
#: members on other hosts
B2 = ("127.0.0.2", 40002)
C3 = ("127.0.0.3", 40003)
TOKEN = re.compile(r"/v ([a-z2-7]{8})\b")


def cookie(reply: str) -> str | None:
    """The cookie in a join prompt's machine line, as a client reads it."""
    for line in reply.splitlines():
        event = parse_event(line)
        if event is not None and event.name == "v":
            return event.value
    return None


class Recorder:
    """A Sender that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def send(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def send_many(self, data: bytes, addrs: list[Any]) -> None:
        for addr in addrs:
            self.send(data, addr)

    def to(self, addr: Any) -> list[str]:
        return [d.decode() for d, a in self.sent if a == addr]

    def take(self, addr: Any) -> list[str]:
        lines = self.to(addr)
        self.sent = [(d, a) for d, a in self.sent if a != addr]
        return lines

    def bytes_to(self, addr: Any) -> int:
        return sum(len(d) for d, a in self.sent if a == addr)


def make(**chat: str) -> tuple[ChatState, Recorder, Clock]:
    clock = Clock()
    clock.advance(1_000_000)
    state = ChatState(settings(chat=chat).chat, clock, key=b"k" * 32)
    return state, Recorder(), clock


def say(state: ChatState, out: Recorder, addr: Any, text: str) -> None:
    data = text.encode()
    state.receive(out, addr, len(data), clean(data.decode()))


def join(state: ChatState, out: Recorder, addr: Any, nick: str | None = None) -> None:
    """Validate C{addr} the way a person on nc -u would."""
    say(state, out, addr, "hello, is anyone there?\n")
    (welcome,) = out.take(addr)
    token = TOKEN.search(welcome)
    assert token is not None, welcome
    say(state, out, addr, f"/v {token.group(1)}\n")
    assert addr in state.members
    if nick:
        say(state, out, addr, f"/nick {nick}\n")
    out.take(addr)


class ValidationTests(SynchronousTestCase):
    def test_first_datagram_gets_welcome_not_membership(self) -> None:
        state, out, _ = make()
        say(state, out, A, "hello, is anyone there? I would like to chat\n")
        (welcome,) = out.to(A)
        self.assertTrue(welcome.startswith("*** welcome"))
        self.assertRegex(welcome, TOKEN)
        self.assertIn("#lobby", welcome)
        self.assertNotIn(A, state.members)

    def test_token_joins_default_room_with_guest_nick(self) -> None:
        state, out, _ = make()
        join(state, out, A)
        member = state.members[A]
        self.assertTrue(member.nick.startswith("guest-"))
        assert member.room is not None
        self.assertEqual(member.room.name, "lobby")

    def test_welcome_fits_three_times_what_was_received(self) -> None:
        state, out, _ = make()
        for text in ["hello\n", "hey you\n", "x" * 20, "y" * 40]:
            addr = ("127.0.0.9", 1000 + len(text))
            say(state, out, addr, text)
            (reply,) = out.to(addr)
            self.assertLessEqual(len(reply), AMPLIFICATION * len(text))
            self.assertEqual(cookie(reply), state.token(addr))

    def test_tiny_datagram_gets_nothing_then_credit_accumulates(self) -> None:
        state, out, _ = make()
        say(state, out, A, "hi\n")
        self.assertEqual(out.to(A), [])
        say(state, out, A, "hi\n")
        (reply,) = out.to(A)
        self.assertLessEqual(len(reply), AMPLIFICATION * 6)
        self.assertEqual(cookie(reply), state.token(A))

    def test_spoofed_source_never_gets_more_than_three_times(self) -> None:
        # An attacker sends, under the victim's address, every kind of
        # datagram; the victim never answers the cookie.
        state, out, clock = make(rate="1000", burst="1000")
        received = 0
        payloads = [b"/help\n", b"/who\n", b"x" * 2000, b"\xff\xfe", b"hi", b""]
        payloads += [b"/v aaaaaaaa\n", b"/join x\n", b"/hello padding!!\n"]
        for i in range(300):
            data = payloads[i % len(payloads)]
            received += len(data)
            try:
                text = data.decode()
            except UnicodeDecodeError:
                state.refuse(out, A, len(data), "message is not valid UTF-8", "invalid")
            else:
                if len(data) > 1026:
                    state.refuse(
                        out, A, len(data), "message longer than 1024 bytes", "oversized"
                    )
                else:
                    state.receive(out, A, len(data), clean(text))
            clock.advance(0.01)
            self.assertLessEqual(out.bytes_to(A), AMPLIFICATION * received)
        self.assertNotIn(A, state.members)
        self.assertGreater(out.bytes_to(A), 0)

    def test_forgetting_pending_addresses_keeps_the_bound(self) -> None:
        state, out, _ = make(rate="1000", burst="1000")
        state.max_pending = 4
        received = 0
        for i in range(50):
            say(state, out, A, "hello there\n")
            received += len("hello there\n")
            for j in range(5):  # push A out of the table
                say(state, out, ("127.0.0.5", 2000 + i * 5 + j), "hello there\n")
            self.assertLessEqual(out.bytes_to(A), AMPLIFICATION * received)

    def test_unvalidated_address_gets_no_room_traffic(self) -> None:
        state, out, _ = make()
        join(state, out, A, "alice")
        say(state, out, B, "hello, anyone?\n")  # B never validates
        out.take(B)
        say(state, out, A, "secret plans\n")
        say(state, out, B, "/who\n")
        for line in out.to(B):
            self.assertNotIn("secret", line)
            self.assertNotIn("alice", line)

    def test_unvalidated_text_is_not_relayed(self) -> None:
        state, out, _ = make()
        join(state, out, A, "alice")
        say(state, out, B, "spam spam spam spam\n")
        self.assertEqual(out.to(A), [])

    def test_wrong_or_foreign_token_does_not_validate(self) -> None:
        state, out, _ = make()
        say(state, out, A, "hello, is anyone there?\n")
        token = TOKEN.search(out.take(A)[0])
        assert token is not None
        say(state, out, B, f"/v {token.group(1)}\n")  # A's token, from B
        say(state, out, A, "/v abcdefgh\n")
        self.assertEqual(state.members, {})

    def test_token_expires_after_two_epochs(self) -> None:
        state, out, clock = make()
        say(state, out, A, "hello, is anyone there?\n")
        token = TOKEN.search(out.take(A)[0])
        assert token is not None
        clock.advance(EPOCH * 2 + 1)
        say(state, out, A, f"/v {token.group(1)}\n")
        self.assertNotIn(A, state.members)

    def test_token_is_case_insensitive(self) -> None:
        state, out, _ = make()
        say(state, out, A, "hello, is anyone there?\n")
        token = TOKEN.search(out.take(A)[0])
        assert token is not None
        say(state, out, A, f"/v {token.group(1).upper()}\n")
        self.assertIn(A, state.members)

    def test_different_key_different_token(self) -> None:
        one, _, _ = make()
        two = ChatState(one.settings, one.clock, key=b"j" * 32)
        self.assertNotEqual(one.token(A), two.token(A))

    def test_loop_ports_never_answered(self) -> None:
        state, out, _ = make()
        for port in (0, 7, 19, 53, 1900, 5353, 11211, 9001):
            say(state, out, ("127.0.0.1", port), "hello, is anyone there?\n")
        self.assertEqual(out.sent, [])

    def test_one_port_table_with_echo(self) -> None:
        import sockd.chat.state as chat
        import sockd.core.limits as limits

        self.assertIs(chat.LOOP_PORTS, limits.LOOP_PORTS)

    def test_echo_service_at_spoofed_address_gets_no_loop(self) -> None:
        # Someone spoofs a datagram "from" an echo service on an unusual
        # port: it echoes each welcome back; the relay must not answer that.
        state, out, _ = make(rate="1000", burst="1000")
        echo = ("127.0.0.7", 9001)
        say(state, out, echo, "hello, is anyone there? I would like to chat\n")
        for _ in range(10):
            if not out.sent:
                break
            data, addr = out.sent.pop()
            self.assertEqual(addr, echo)
            say(state, out, echo, data.decode())  # the echo
        self.assertEqual(out.sent, [])
        self.assertNotIn(echo, state.members)

    def test_validation_off_joins_at_once_and_says(self) -> None:
        state, out, _ = make(validation="false")
        join_a = "hello"
        say(state, out, A, "/nick alice\n")
        self.assertEqual(state.members[A].nick, "alice")
        say(state, out, B, join_a + "\n")
        self.assertIn(B, state.members)
        self.assertIn("<guest-2> hello\n", out.to(A))

    def test_stranger_replies_rate_limited(self) -> None:
        state, out, _ = make(rate="1", burst="3")
        for _ in range(10):
            say(state, out, A, "hello, is anyone there?\n")
        self.assertEqual(len(out.to(A)), 3)


class RoomTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state, self.out, self.clock = make()
        join(self.state, self.out, A, "alice")
        join(self.state, self.out, B, "bob")
        self.out.sent.clear()

    def test_text_relayed_to_others_not_sender(self) -> None:
        say(self.state, self.out, A, "hi bob\n")
        self.assertEqual(self.out.to(B), ["<alice> hi bob\n"])
        self.assertEqual(self.out.to(A), [])

    def test_members_of_several_ports_all_hear_it(self) -> None:
        # C came in through another port: its datagrams leave through it.
        other = Recorder()
        join(self.state, other, C, "carol")
        D = ("127.0.0.1", 40004)
        join(self.state, self.out, D, "dave")
        self.out.sent.clear()
        other.sent.clear()
        say(self.state, self.out, A, "hi all\n")
        self.assertEqual(self.out.to(B), ["<alice> hi all\n"])
        self.assertEqual(self.out.to(D), ["<alice> hi all\n"])
        self.assertEqual(other.sent, [(b"<alice> hi all\n", C)])
        self.assertEqual(self.out.to(A), [])
        # And from the other port: alice, bob and dave through self.out.
        self.out.sent.clear()
        other.sent.clear()
        say(self.state, other, C, "hello\n")
        for addr in (A, B, D):
            self.assertEqual(self.out.to(addr), ["<carol> hello\n"])
        self.assertEqual(other.sent, [])

    def test_crlf_and_blank_lines(self) -> None:
        say(self.state, self.out, A, "hi\r\n")
        say(self.state, self.out, A, "\n")
        self.assertEqual(self.out.to(B), ["<alice> hi\n"])

    def test_several_lines_are_several_messages(self) -> None:
        say(self.state, self.out, A, "one\ntwo\n/me waves\n")
        self.assertEqual(
            self.out.to(B), ["<alice> one\n", "<alice> two\n", "* alice waves\n"]
        )

    def test_double_slash_says_a_slash(self) -> None:
        say(self.state, self.out, A, "//help is literal\n")
        self.assertEqual(self.out.to(B), ["<alice> /help is literal\n"])

    def test_join_notice_and_history(self) -> None:
        say(self.state, self.out, A, "first\n")
        say(self.state, self.out, A, "second\n")
        self.out.sent.clear()
        join(self.state, self.out, C, "carol")
        self.assertEqual(
            self.out.to(A),
            ["*** guest-3 joined #lobby\n", "*** guest-3 is now known as carol\n"],
        )
        # join() took C's lines; check again with a fresh member elsewhere
        say(self.state, self.out, C, "/join dev\n")
        say(self.state, self.out, C, "/join lobby\n")
        lines = self.out.take(C)
        self.assertIn("<alice> first\n", lines)
        self.assertIn("<alice> second\n", lines)
        self.assertLess(lines.index("<alice> first\n"), lines.index("<alice> second\n"))

    def test_history_length_is_bounded(self) -> None:
        state, out, _ = make(history="2")
        join(state, out, A, "alice")
        for i in range(5):
            say(state, out, A, f"m{i}\n")
        join(state, out, B)
        say(state, out, B, "/join x\n")
        say(state, out, B, "/join lobby\n")
        said = [line for line in out.to(B) if line.startswith("<")]
        self.assertEqual(said, ["<alice> m3\n", "<alice> m4\n"])

    def test_nick_change_announced_and_unique_ignoring_case(self) -> None:
        say(self.state, self.out, A, "/nick Alicia\n")
        self.assertIn("*** alice is now known as Alicia\n", self.out.to(B))
        say(self.state, self.out, B, "/nick ALICIA\n")
        self.assertEqual(
            self.out.take(B)[-1],
            "*** error: ALICIA is taken; free if its holder stays silent 5s more\n"
            "*** @taken=ALICIA retry=5\n",
        )
        self.assertEqual(self.state.members[B].nick, "bob")
        # the old name is free again
        say(self.state, self.out, B, "/nick alice\n")
        self.assertEqual(self.state.members[B].nick, "alice")

    def test_bad_nicks(self) -> None:
        for bad in ["", "9lives", "a b", "x" * 17, "guest-5", "Admin", "é", "a*"]:
            say(self.state, self.out, A, f"/nick {bad}\n")
            (reply,) = self.out.take(A)
            self.assertTrue(reply.startswith("*** error: "), (bad, reply))
            self.assertEqual(self.state.members[A].nick, "alice")

    def test_join_and_part(self) -> None:
        say(self.state, self.out, A, "/join #Dev\n")
        self.assertIn("*** alice left #lobby\n", self.out.take(B))
        self.assertIn(
            "*** you joined #Dev (1 member)\n*** @room=Dev\n", self.out.take(A)
        )
        say(self.state, self.out, B, "/join dev\n")
        self.assertIn("*** bob joined #Dev\n", self.out.take(A))
        say(self.state, self.out, A, "/part\n")
        self.assertIn("*** alice left #Dev\n", self.out.take(B))
        self.assertEqual(
            self.out.take(A), ["*** you left #Dev; /join ROOM to enter one\n"]
        )
        say(self.state, self.out, A, "lonely\n")
        self.assertEqual(
            self.out.take(A), ["*** error: you are in no room; /join ROOM\n"]
        )
        self.assertEqual(self.out.to(B), [])

    def test_empty_room_forgotten_but_default_kept(self) -> None:
        say(self.state, self.out, A, "/join tmp\n")
        self.assertIn("tmp", self.state.rooms)
        say(self.state, self.out, A, "/part\n")
        self.assertNotIn("tmp", self.state.rooms)
        say(self.state, self.out, B, "/join tmp\n")
        self.assertIn("lobby", self.state.rooms)

    def test_bad_room_names(self) -> None:
        for bad in ["", "a b", "x" * 33, "#", "caf\u00e9"]:
            say(self.state, self.out, A, f"/join {bad}\n")
            (reply,) = self.out.take(A)
            self.assertTrue(reply.startswith("*** error: "), (bad, reply))

    def test_room_and_member_caps(self) -> None:
        state, out, _ = make(max_rooms="2", max_room_members="1", max_members="2")
        join(state, out, A, "alice")  # alone in lobby
        say(state, out, A, "/join one\n")
        self.assertIn("*** you joined #one (1 member)\n*** @room=one\n", out.take(A))
        join(state, out, B, "bob")
        say(state, out, B, "/join two\n")
        self.assertEqual(
            out.take(B), ["*** error: too many rooms; join an existing one (/rooms)\n"]
        )
        say(state, out, B, "/join one\n")
        self.assertEqual(out.take(B), ["*** error: #one is full; try later\n"])
        say(state, out, C, "hello, is anyone there?\n")
        self.assertEqual(out.take(C), ["*** error: the chat is full; try later\n"])

    def test_direct_message(self) -> None:
        join(self.state, self.out, C, "carol")
        say(self.state, self.out, C, "/join elsewhere\n")
        self.out.sent.clear()
        say(self.state, self.out, A, "/msg CAROL psst, over here\n")
        self.assertEqual(self.out.to(C), ["[msg] <alice> psst, over here\n"])
        self.assertEqual(self.out.to(A), ["[msg -> carol] psst, over here\n"])
        self.assertEqual(self.out.to(B), [])
        say(self.state, self.out, A, "/msg nobody hi\n")
        self.assertIn("no one is called", self.out.take(A)[-1])
        say(self.state, self.out, A, "/msg bob\n")
        self.assertEqual(self.out.take(A), ["*** error: usage: /msg NICK TEXT\n"])

    def test_who_rooms_topic_ping_help(self) -> None:
        say(self.state, self.out, A, "/who\n")
        self.assertEqual(self.out.take(A), ["*** #lobby (2): alice, bob\n"])
        say(self.state, self.out, A, "/rooms\n")
        self.assertEqual(self.out.take(A), ["*** 1 rooms: #lobby (2)\n"])
        say(self.state, self.out, A, "/topic\n")
        self.assertEqual(self.out.take(A), ["*** topic of #lobby: (none)\n"])
        say(self.state, self.out, A, "/topic plans for friday\n")
        notice = "*** alice set the topic of #lobby: plans for friday\n"
        self.assertEqual(self.out.take(B), [notice])
        self.assertEqual(self.out.take(A), [notice])
        say(self.state, self.out, A, "/ping\n")
        self.assertEqual(self.out.take(A), ["*** pong\n"])
        say(self.state, self.out, A, "/HELP\n")
        (help_text,) = self.out.take(A)
        for command in ("/nick", "/join", "/part", "/msg", "/me", "/who", "/quit"):
            self.assertIn(command, help_text)

    def test_unknown_command_one_error(self) -> None:
        say(self.state, self.out, A, "/frobnicate now\n")
        self.assertEqual(
            self.out.take(A),
            ["*** error: unknown command /frobnicate; /help lists the commands\n"],
        )
        self.assertEqual(self.out.to(B), [])

    def test_quit(self) -> None:
        say(self.state, self.out, A, "/quit\nnever said\n")
        self.assertEqual(self.out.take(A), ["*** bye\n"])
        self.assertEqual(self.out.to(B), ["*** alice quit #lobby\n"])
        self.assertNotIn(A, self.state.members)
        self.assertNotIn("alice", self.state.nicks)


class PresenceTests(SynchronousTestCase):
    def test_silent_member_times_out_with_notice(self) -> None:
        state, out, clock = make(idle_timeout="60")
        join(state, out, A, "alice")
        join(state, out, B, "bob")
        out.sent.clear()
        for _ in range(5):
            clock.advance(20)
            say(state, out, A, "/ping\n")
            state.expire()
        self.assertNotIn(B, state.members)
        self.assertIn(A, state.members)
        self.assertIn("*** bob timed out from #lobby\n", out.to(A))
        self.assertIn("silence", out.to(B)[-1])
        self.assertEqual(state.stats["timed_out"], 1)

    def test_any_datagram_counts_even_errors(self) -> None:
        state, out, clock = make(idle_timeout="60")
        join(state, out, A, "alice")
        for _ in range(4):
            clock.advance(30)
            state.refuse(out, A, 2, "message is not valid UTF-8", "invalid")
            state.expire()
        self.assertIn(A, state.members)

    def test_timed_out_member_must_validate_again(self) -> None:
        state, out, clock = make(idle_timeout="10")
        join(state, out, A, "alice")
        clock.advance(11)
        state.expire()
        out.sent.clear()
        say(state, out, A, "I am back, am I not?\n")
        self.assertRegex(out.to(A)[0], TOKEN)


class LimitTests(SynchronousTestCase):
    def test_per_member_rate_one_notice(self) -> None:
        state, out, clock = make(rate="1", burst="3")
        join(state, out, A, "alice")
        join(state, out, B, "bob")
        clock.advance(10)
        out.sent.clear()
        for i in range(10):
            say(state, out, A, f"m{i}\n")
        self.assertEqual(len(out.to(B)), 3)
        errors = out.to(A)
        self.assertEqual(len(errors), 1)
        self.assertIn("too fast", errors[0])
        clock.advance(1)
        say(state, out, A, "later\n")
        self.assertEqual(out.to(B)[-1], "<alice> later\n")

    def test_refusals_counted_by_code_not_text(self) -> None:
        state, out, clock = make()
        join(state, out, A, "alice")
        # The text is the client's to read; the code picks the counter.
        state.refuse(out, A, 3000, "no longer than that, please", "invalid")
        state.refuse(out, A, 3000, "too big", "oversized")
        self.assertEqual((state.dropped["invalid"], state.dropped["oversized"]), (1, 1))
        self.assertIn("*** error: too big\n", out.to(A))

    def test_reload_applies_the_new_rate_to_members(self) -> None:
        state, out, clock = make(rate="1", burst="3")
        join(state, out, A, "alice")
        join(state, out, B, "bob")

        def passed(chat: dict[str, str], wait: float, tries: int) -> list[str]:
            """Reload with C{chat}; after C{wait}, what alice gets said."""
            state.reconfigure(settings(chat=chat).chat, state.max_message)
            clock.advance(wait)
            out.sent.clear()
            for i in range(tries):
                say(state, out, A, f"m{i}\n")
            return [line for line in out.to(B) if line.startswith("<alice>")]

        self.assertEqual(len(passed({"rate": "10", "burst": "20"}, 10, 30)), 20)
        self.assertEqual(
            passed({"rate": "1", "burst": "2"}, 100, 5),
            ["<alice> m0\n", "<alice> m1\n"],
        )

    def three_on_a_small_budget(self) -> tuple[ChatState, Recorder, Clock]:
        """alice, bob and carol (three hosts) in one room; 5 datagrams/s."""
        state, out, clock = make(total_output_rate="5", max_room_members="3")
        clock.advance(100)
        for addr, nick in ((A, "alice"), (B2, "bob"), (C3, "carol")):
            join(state, out, addr, nick)
            clock.advance(100)
        out.sent.clear()
        return state, out, clock

    def test_global_output_budget(self) -> None:
        # Each within its share: the budget itself runs out.
        state, out, clock = self.three_on_a_small_budget()
        for i in range(10):
            for addr in (A, B2, C3):
                say(state, out, addr, f"m{i}\n")
        delivered = [line for line in out.to(B2) if line.startswith("<")]
        self.assertLess(len(delivered), 20)
        self.assertGreater(state.dropped["total"], 0)

    def test_over_budget_is_told_for_text_and_actions(self) -> None:
        state, out, clock = self.three_on_a_small_budget()
        busy = "*** error: the server is busy; not delivered\n"
        for text in ("one more\n", "/me waves\n"):
            # One token left: too few to relay to two, enough to say why.
            state.output.tokens, state.output.stamp = 1.0, clock.seconds()
            say(state, out, A, text)
        self.assertEqual(out.to(A), [busy, busy])
        self.assertEqual(out.to(B2), [])

    def test_flooder_does_not_stop_others(self) -> None:
        state, out, clock = make(rate="5", burst="5")
        join(state, out, A, "alice")
        join(state, out, B, "bob")
        join(state, out, C, "carol")
        clock.advance(10)
        out.sent.clear()
        for i in range(1000):
            say(state, out, C, f"flood {i}\n")
        say(state, out, A, "still here\n")
        self.assertIn("<alice> still here\n", out.to(B))


def ports(host: str, count: int, first: int = 20000) -> list[tuple[str, int]]:
    return [(host, first + i) for i in range(count)]


def try_join(state: ChatState, out: Recorder, addr: Any) -> list[str]:
    """Say hello and return the cookie if one comes; what C{addr} was told."""
    out.take(addr)
    say(state, out, addr, "hello, is anyone there?\n")
    told = out.take(addr)
    token = TOKEN.search(told[0]) if told else None
    if token is not None:
        say(state, out, addr, f"/v {token.group(1)}\n")
        told += out.take(addr)
    return told


class PerAddressTests(SynchronousTestCase):
    """One host (many ports, or many addresses of one IPv6 /64) is one client."""

    def test_one_address_many_ports_cannot_exceed_its_cap(self) -> None:
        state, out, clock = make(max_members_per_ip="4", rate="1000", burst="1000")
        for addr in ports("127.0.0.2", 50):
            try_join(state, out, addr)
            clock.advance(0.01)
        self.assertEqual(len(state.members), 4)
        self.assertEqual(state.peers, {"127.0.0.2": 4})
        told = try_join(state, out, ("127.0.0.2", 30000))
        self.assertEqual(
            told,
            ["*** error: too many members from your address (at most 4); try later\n"],
        )
        self.assertEqual(state.refused["per_ip"], 47)

    def test_newcomer_from_another_address_joins(self) -> None:
        # The finding: one IP's ports filled max_members; here it stops at
        # its own cap, well below it.
        state, out, clock = make(
            max_members="10", max_members_per_ip="4", rate="1000", burst="1000"
        )
        for addr in ports("127.0.0.2", 20):
            try_join(state, out, addr)
        told = try_join(state, out, ("127.0.0.3", 40000))
        self.assertIn(("127.0.0.3", 40000), state.members, told)
        self.assertTrue(told[1].startswith("*** welcome, you are guest-"))

    def test_cookie_returned_after_the_cap_is_reached_is_refused(self) -> None:
        state, out, _ = make(max_members_per_ip="1")
        late = ("127.0.0.2", 20001)
        say(state, out, late, "hello, is anyone there?\n")
        token = TOKEN.search(out.take(late)[0])
        assert token is not None
        join(state, out, ("127.0.0.2", 20000))
        say(state, out, late, f"/v {token.group(1)}\n")
        self.assertNotIn(late, state.members)
        self.assertEqual(
            out.take(late),
            ["*** error: too many members from your address (at most 1); try later\n"],
        )

    def test_validation_off_counts_too(self) -> None:
        state, out, _ = make(validation="false", max_members_per_ip="2")
        for addr in ports("127.0.0.2", 5):
            say(state, out, addr, "hello, is anyone\n")  # credit: the short one
        self.assertEqual(len(state.members), 2)
        self.assertEqual(
            out.to(("127.0.0.2", 20004)),
            ["*** error: too many members from your address\n"],
        )

    def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4(self) -> None:
        state, out, _ = make(max_members_per_ip="2")
        one_64 = [("2001:db8::1", 1000), ("2001:db8::2", 1000)]
        one_64 += [("2001:db8::ffff:1:2", 1000)]
        for addr in one_64:
            try_join(state, out, addr)
        self.assertEqual(set(state.members), set(one_64[:2]))
        try_join(state, out, ("2001:db8:0:1::1", 1000))  # the next /64
        self.assertIn(("2001:db8:0:1::1", 1000), state.members)
        try_join(state, out, ("127.0.0.5", 1000))
        try_join(state, out, ("::ffff:127.0.0.5", 1001))
        told = try_join(state, out, ("::ffff:127.0.0.5", 1002))
        self.assertIn("too many members from your address", told[0])
        self.assertEqual(
            state.peers, {"2001:db8::/64": 2, "2001:db8:0:1::/64": 1, "127.0.0.5": 2}
        )

    def test_leaving_gives_the_place_back(self) -> None:
        state, out, clock = make(max_members_per_ip="2", idle_timeout="10")
        first, second, third = ports("127.0.0.2", 3)
        join(state, out, first)
        join(state, out, second)
        self.assertNotIn(third, state.members)
        try_join(state, out, third)
        self.assertNotIn(third, state.members)
        say(state, out, first, "/quit\n")
        try_join(state, out, third)
        self.assertIn(third, state.members)
        clock.advance(11)
        state.expire()
        self.assertEqual(state.peers, {})

    def test_reload_applies_the_new_cap(self) -> None:
        state, out, _ = make(max_members_per_ip="2")
        host = ports("127.0.0.2", 5)
        for addr in host:
            try_join(state, out, addr)
        self.assertEqual(len(state.members), 2)
        state.reconfigure(
            settings(chat={"max_members_per_ip": "3"}).chat, state.max_message
        )
        for addr in host:
            try_join(state, out, addr)
        self.assertEqual(len(state.members), 3)
        # Lowered: the members stay; nobody else from there gets in.
        state.reconfigure(
            settings(chat={"max_members_per_ip": "1"}).chat, state.max_message
        )
        say(state, out, host[0], "/quit\n")
        told = try_join(state, out, host[0])
        self.assertEqual(
            told,
            ["*** error: too many members from your address (at most 1); try later\n"],
        )
        self.assertEqual(len(state.members), 2)

    def test_pending_table_bounded_per_address(self) -> None:
        # A first datagram too short for any welcome is remembered so that
        # its credit adds up; one host's ports must not push it out.
        state, out, _ = make(rate="1000", burst="1000")
        state.max_pending, state.max_pending_per_ip = 16, 4
        shy = ("127.0.0.3", 40000)
        say(state, out, shy, "hi\n")
        self.assertEqual(out.to(shy), [])
        for addr in ports("127.0.0.2", 100):
            say(state, out, addr, "hello, is anyone there?\n")
        self.assertEqual(len(state.pending_peers["127.0.0.2"]), 4)
        self.assertLessEqual(len(state.pending), 5)
        say(state, out, shy, "hi\n")  # 6 bytes in all: the shortest welcome
        (welcome,) = out.to(shy)
        self.assertEqual(cookie(welcome), state.token(shy))

    def test_handshake_budget_not_taken_by_one_host(self) -> None:
        state, out, clock = make(rate="1", burst="1", max_members_per_ip="4")
        state.strangers.total = TokenBucket(10, 10, clock)  # replies/s, in all
        for addr in ports("127.0.0.2", 50):
            say(state, out, addr, "hello, is anyone there?\n")
        answered = {a for _, a in out.sent}
        self.assertEqual(len(answered), 4)  # its members' worth of bursts
        newcomer = ("127.0.0.3", 40000)
        say(state, out, newcomer, "hello, is anyone there?\n")
        (welcome,) = out.to(newcomer)
        self.assertRegex(welcome, TOKEN)


class TokenBucketTakeTests(SynchronousTestCase):
    """C{TokenBucket.take}, written for speed, charges as L{available} says."""

    @given(
        rate=st.floats(0.01, 1e6),
        burst=st.floats(1, 1e6),
        steps=st.lists(
            st.tuples(
                st.floats(0, 100),  # seconds before the step
                st.sampled_from([0.5, 1.0, 1.0, 1.0, 3.0]),  # cost
                st.one_of(
                    st.none(), st.tuples(st.floats(0.01, 1e6), st.floats(1, 1e6))
                ),
            ),
            max_size=40,
        ),
    )
    def test_same_answers_and_state_as_a_token_bucket(
        self,
        rate: float,
        burst: float,
        steps: list[tuple[float, float, tuple[float, float] | None]],
    ) -> None:
        clock = Clock()
        clock.advance(1000)
        mine, stock = TokenBucket(rate, burst, clock), TokenBucket(rate, burst, clock)
        for wait, cost, reload in steps:
            clock.advance(wait)
            if reload is not None:  # as ChatState.reconfigure does
                for bucket in (mine, stock):
                    bucket.rate, bucket.burst = reload
            enough = stock.available() >= cost
            if enough:
                stock.tokens -= cost
            self.assertEqual(mine.take(cost), enough)
            self.assertEqual((mine.tokens, mine.stamp), (stock.tokens, stock.stamp))


class FairShareTests(SynchronousTestCase):
    """The output budget between client addresses."""

    def make(self, rate: float = 100.0, floor: float = 10.0) -> FairShare:
        clock = Clock()
        return FairShare(TokenBucket(rate, rate, clock), floor, clock)

    def test_a_lone_address_may_use_the_whole_budget(self) -> None:
        share = self.make()
        clock = share.clock
        assert isinstance(clock, Clock)
        granted = 0
        for _ in range(1000):  # 10 s asking for 10/step, 100 steps a second
            if share.take("a", 10) is None:
                granted += 10
            clock.advance(0.01)
        self.assertGreaterEqual(granted, 100 * 10 * 0.9)

    def test_a_newcomer_finds_room_after_a_hog_drained_what_it_could(self) -> None:
        share = self.make()
        clock = share.clock
        assert isinstance(clock, Clock)
        while share.take("hog", 1) is None:
            pass
        # The hog emptied its own share and the spare, not the reserve.
        self.assertEqual(share.take("new", 10), None)
        self.assertEqual(share.take("hog", 1), "share")

    def test_each_sender_gets_its_share_under_pressure(self) -> None:
        share = self.make(rate=300.0)
        clock = share.clock
        assert isinstance(clock, Clock)
        granted = {"hog": 0, "a": 0, "b": 0}
        for step in range(1000):  # 10 s
            for _ in range(50):  # the hog asks for everything, all the time
                if share.take("hog", 1) is None:
                    granted["hog"] += 1
            if step % 10 == 0:  # a and b want 10 a second each
                for peer in ("a", "b"):
                    if share.take(peer, 1) is None:
                        granted[peer] += 1
            clock.advance(0.01)
        self.assertEqual(granted["a"], 100)
        self.assertEqual(granted["b"], 100)
        # What a and b leave goes to the hog: nothing is wasted.
        self.assertGreaterEqual(sum(granted.values()), 300 * 10 * 0.9)

    def test_no_address_and_the_total(self) -> None:
        share = self.make(rate=10.0)
        self.assertIsNone(share.take(None, 10))
        self.assertEqual(share.take(None, 1), "total")
        self.assertEqual(share.take("a", 1), "total")
        self.assertEqual(share.buckets["a"].tokens, 10.0)  # not charged


class FloodTests(SynchronousTestCase):
    def test_flood_from_one_host_leaves_another_its_messages(self) -> None:
        # The finding, scaled down: 60 members of one host each say 5 lines
        # a second (their own rate) in the room, 60 x 5 x 61 datagrams/s
        # wanted against 1000/s; a member on another host says 30 lines,
        # 2 a second, and a third host's member should get them.
        state, out, clock = make(
            total_output_rate="1000",
            max_members_per_ip="60",
            rate="5",
            burst="10",
            idle_timeout="600",
        )
        flood = ports("127.0.0.2", 60)
        for addr in flood:
            join(state, out, addr)
        legit, watcher = ("127.0.0.3", 40000), ("127.0.0.4", 40000)
        join(state, out, legit, "legit")
        join(state, out, watcher, "watcher")
        clock.advance(10)
        out.sent.clear()
        said = 0
        for step in range(75):  # 15 s, a step every 0.2 s
            for n, addr in enumerate(flood):
                say(state, out, addr, f"flood {step} {n}\n")
            if step % 5 in (2, 4) and said < 30:
                say(state, out, legit, f"legit {said}\n")
                said += 1
            clock.advance(0.2)
        got = [line for line in out.to(watcher) if line.startswith("<legit> ")]
        self.assertEqual(len(got), 30)
        self.assertEqual(
            [line for line in out.to(legit) if line.startswith("*** error")], []
        )
        flooded = [line for line in out.to(watcher) if line.startswith("<guest-")]
        self.assertGreater(len(flooded), 0)
        self.assertGreater(state.dropped["share"], 0)
        # The budget held: at most its rate and burst in 15 s.
        self.assertLessEqual(len(out.sent), 1000 * 15 + 1000)


class RelayedTextTests(SynchronousTestCase):
    """What members say reaches the others terminal-safe."""

    def test_a_line_cannot_pass_for_two(self) -> None:
        state, out, _ = make()
        join(state, out, A, "alice")
        join(state, out, B, "bob")
        say(state, out, A, "ok\u2028<bob> \u200fI owe alice 100\u2029\n")
        self.assertEqual(
            out.to(B), ["<alice> ok\ufffd<bob> \ufffdI owe alice 100\ufffd\n"]
        )

    def test_relayed_escape_is_neutralised(self) -> None:
        state, out, _ = make()
        join(state, out, A, "alice")
        join(state, out, B, "bob")
        say(state, out, A, "\x1b]0;pwned\x07\x1b[2J\u009b31m\u202eevil\r\n")
        (line,) = out.to(B)
        self.assertNotIn("\x1b", line)
        self.assertNotIn("\x07", line)
        self.assertNotIn("\u009b", line)
        self.assertNotIn("\u202e", line)
        self.assertNotIn("\r", line)
        self.assertTrue(line.startswith("<alice> "))


def lines_to(out: Recorder, addr: Any) -> list[str]:
    """Every line C{addr} was sent, datagram after datagram."""
    return [line for data in out.to(addr) for line in data.splitlines()]


class MachineLineTests(SynchronousTestCase):
    """The machine lines that go with the join prompts and notices."""

    def test_join_prompts_byte_by_byte(self) -> None:
        state, out, _ = make()
        full = (
            "*** welcome to sockd chat. To join #lobby, send: /v {t} "
            "(then /nick NAME to pick a name, /help for commands)\n*** @v={t}\n"
        )
        medium = "*** welcome to sockd chat; to join, send: /v {t}\n*** @v={t}\n"
        short = "*** to join, send: /v {t}\n*** @v={t}\n"
        bare = "*** @v={t}\n"
        for size, prompt in [(44, full), (24, medium), (16, short), (6, bare)]:
            addr = ("127.0.0.9", 1000 + size)
            say(state, out, addr, "x" * (size - 1) + "\n")
            expected = prompt.format(t=state.token(addr))
            self.assertEqual(out.to(addr), [expected])
            self.assertLessEqual(len(expected), AMPLIFICATION * size)
            self.assertGreater(len(expected), AMPLIFICATION * (size - 1))
        # README: "a first datagram of 5 bytes or fewer gets no answer".
        say(state, out, B, "five\n")
        self.assertEqual(out.to(B), [])

    def test_notices_carry_their_machine_lines(self) -> None:
        state, out, clock = make(idle_timeout="60")
        say(state, out, A, "hello, is anyone there?\n")
        say(state, out, A, f"/v {cookie(out.take(A)[0])}\n")
        self.assertEqual(
            out.take(A),
            [
                "*** welcome, you are guest-1. /nick NAME to pick a name, /help "
                "for commands; silent members leave after 60s (/ping keeps you "
                "here)\n*** @welcome nick=guest-1\n",
                "*** you joined #lobby (1 member)\n*** @room=lobby\n",
            ],
        )
        say(state, out, A, "/nick alice\n/join #Dev\n/hello\n/part\n/v\n")
        self.assertEqual(
            out.take(A),
            [
                "*** you are now alice\n*** @nick=alice\n",
                "*** you joined #Dev (1 member)\n*** @room=Dev\n",
                "*** you are alice in #Dev\n*** @member nick=alice room=Dev\n",
                "*** you left #Dev; /join ROOM to enter one\n",
                "*** you are alice in no room\n*** @member nick=alice\n",
            ],
        )
        clock.advance(61)
        state.expire()
        self.assertEqual(
            out.take(A),
            [
                "*** you were dropped after 60s of silence; send anything to "
                "come back\n*** @dropped\n"
            ],
        )

    def test_members_cannot_write_machine_lines(self) -> None:
        # Only the server's own notices carry them: a member's text, however
        # it is sent, is never read as one by anybody.
        state, out, _ = make(rate="1000", burst="1000")
        join(state, out, A, "alice")
        join(state, out, B, "bob")
        hostile = "*** @v=abcdefgh"
        for text in [
            hostile,
            "*** @welcome nick=mallory",
            "*** @dropped",
            "//*** @v=abcdefgh",
            f"/me {hostile}",
            f"/msg bob {hostile}",
            f"/msg {hostile}",
            f"/topic {hostile}",
            "/topic",
            f"ok\n{hostile}\n/me x\n*** @nick=mallory",
            f"ok\r\n{hostile}",
            f"ok\r{hostile}",
            f"ok\u2028{hostile}",
            f"ok\u0085{hostile}",
            "/nick @v=abcdefgh",
            "/nick *** @nick=x",
            "/join @v=abcdefgh",
            "/join *** @room=x",
            "/*** @v=abcdefgh",
            "/@v=abcdefgh",
        ]:
            say(state, out, A, text + "\n")
        say(state, out, B, "/who\n/rooms\n/topic\n")
        for addr, count in ((A, 12), (B, 19)):  # everything was answered
            lines = lines_to(out, addr)
            self.assertEqual(len(lines), count, lines)
            for line in lines:
                self.assertIsNone(parse_event(line), (addr, line))
        # What the server says itself is read: bob renames himself.
        out.sent.clear()
        say(state, out, B, "/nick bobby\n")
        events = [parse_event(line) for line in lines_to(out, B)]
        self.assertEqual([e for e in events if e], [Event("nick", "bobby")])


class StrangerHelpTests(SynchronousTestCase):
    """What an address that has not joined is told, within its 3x credit."""

    def replies(self, text: str, sizes: list[int]) -> list[str]:
        """The reply to C{text} padded to each size, from a fresh address."""
        state, out, _ = make()
        found = []
        for size in sizes:
            addr = ("127.0.0.9", 1000 + size)
            data = text + " " * (size - len(text) - 1) + "\n"
            say(state, out, addr, data)
            (reply,) = out.to(addr)
            self.assertLessEqual(len(reply), AMPLIFICATION * size)
            found.append(reply.replace(state.token(addr), "T"))
        return found

    def test_wrong_or_expired_code_says_so(self) -> None:
        self.assertEqual(
            self.replies("/v abcdefgh", [25, 21, 16, 12]),
            [
                "*** that join code is wrong or expired; send: /v T\n*** @v=T\n",
                "*** wrong or expired code; send: /v T\n*** @v=T\n",
                "*** to join, send: /v T\n*** @v=T\n",
                "*** @v=T\n",
            ],
        )
        # Each is the longest that fits: one byte less buys the next one.
        self.assertEqual(
            self.replies("/v abcdefgh", [24, 20]),
            [
                "*** wrong or expired code; send: /v T\n*** @v=T\n",
                "*** to join, send: /v T\n*** @v=T\n",
            ],
        )

    def test_expired_code_after_a_sentence(self) -> None:
        state, out, clock = make()
        say(state, out, A, "hello, is anyone there?\n")
        old = cookie(out.take(A)[0])
        clock.advance(EPOCH * 2 + 1)
        say(state, out, A, f"/v {old}   (this is the code I was given)\n")
        (reply,) = out.take(A)
        new = state.token(A)
        self.assertNotEqual(new, old)
        self.assertEqual(
            reply,
            f"*** that join code is wrong or expired; send: /v {new}\n*** @v={new}\n",
        )
        say(state, out, A, f"/v {new}\n")
        self.assertIn(A, state.members)

    def test_help_before_joining_explains_the_join_step(self) -> None:
        full, medium, short, bare = self.replies("/help", [55, 21, 16, 6])
        self.assertEqual(
            full,
            "*** you are not in the chat yet. To join #lobby, send: /v T (a code "
            "for your address, good for 2 to 4 minutes); then /help lists the "
            "commands\n*** @v=T\n",
        )
        self.assertEqual(medium, "*** not joined yet; to join, send: /v T\n*** @v=T\n")
        self.assertEqual(short, "*** to join, send: /v T\n*** @v=T\n")
        self.assertEqual(bare, "*** @v=T\n")  # /help alone: 18 bytes of credit

    def test_help_does_not_join(self) -> None:
        state, out, _ = make()
        say(state, out, A, "/help me please, how does this work?\n")
        self.assertNotIn(A, state.members)
        self.assertIn("/v " + state.token(A), out.take(A)[0])


class ErrorTextTests(SynchronousTestCase):
    def test_bad_nickname_error_is_never_cut(self) -> None:
        state, out, _ = make()
        join(state, out, A)
        rule = (
            "a nickname is 1 to 16 letters, digits, '_' or '-', starting with a letter"
        )
        say(state, out, A, "/nick 9bad\n")
        self.assertEqual(out.take(A), [f"*** error: 9bad is no nickname: {rule}\n"])
        say(state, out, A, "/nick 9" + "y" * 300 + "\n")
        self.assertEqual(
            out.take(A), [f"*** error: 9{'y' * 31}... is no nickname: {rule}\n"]
        )
        say(state, out, A, "/nick\n")
        self.assertEqual(out.take(A), [f"*** error: usage: /nick NAME; {rule}\n"])

    def test_unknown_command_is_clipped_with_a_mark(self) -> None:
        state, out, _ = make()
        join(state, out, A)
        say(state, out, A, "/" + "z" * 100 + "\n")
        self.assertEqual(
            out.take(A),
            [f"*** error: unknown command /{'z' * 32}...; /help lists the commands\n"],
        )


#: a client restarted on the same host (nc -u after Ctrl-C: a new port)
A_AGAIN = ("127.0.0.1", 40999)


class NickReclaimTests(SynchronousTestCase):
    """A silent member's nickname: its own host first, then anyone."""

    def setUp(self) -> None:
        self.state, self.out, self.clock = make(nick_grace="30", nick_reclaim="5")
        join(self.state, self.out, A, "ann")
        join(self.state, self.out, C3, "carl")
        self.out.sent.clear()

    def nick(self, addr: Any, name: str) -> list[str]:
        say(self.state, self.out, addr, f"/nick {name}\n")
        return self.out.take(addr)

    def test_same_host_reclaims_after_a_few_seconds(self) -> None:
        self.clock.advance(6)
        join(self.state, self.out, A_AGAIN)
        self.assertEqual(
            self.nick(A_AGAIN, "ann"),
            [
                "*** ann is now known as guest-4\n",  # the room's notice
                "*** you are now ann\n*** @nick=ann\n",
            ],
        )
        self.assertEqual(self.state.nicks["ann"].addr, A_AGAIN)
        old = self.state.members[A]
        self.assertTrue(old.nick.startswith("guest-"))
        # The room sees both renames; the old holder gets only the room's
        # notices until it speaks.
        self.assertEqual(
            self.out.take(C3),
            [
                "*** guest-3 joined #lobby\n",
                f"*** ann is now known as {old.nick}\n",
                "*** guest-3 is now known as ann\n",
            ],
        )
        self.assertEqual(
            self.out.to(A),
            ["*** guest-3 joined #lobby\n", "*** guest-3 is now known as ann\n"],
        )
        self.out.sent.clear()
        # When it speaks again it is told, once, with the machine line.
        say(self.state, self.out, A, "/ping\n")
        say(self.state, self.out, A, "/ping\n")
        self.assertEqual(
            self.out.take(A),
            [
                "*** while you were silent, another member took your nickname "
                f"ann; you are now {old.nick} (/nick NAME to pick another)\n"
                f"*** @nick={old.nick}\n",
                "*** pong\n",
                "*** pong\n",
            ],
        )

    def test_same_host_waits_while_the_holder_is_recent(self) -> None:
        self.clock.advance(2)
        join(self.state, self.out, A_AGAIN)
        self.assertEqual(
            self.nick(A_AGAIN, "ANN"),
            [
                "*** error: ANN is taken; free if its holder stays silent 3s more\n"
                "*** @taken=ANN retry=3\n"
            ],
        )
        self.assertEqual(self.state.nicks["ann"].addr, A)

    def test_another_host_waits_for_the_grace(self) -> None:
        self.clock.advance(6)
        self.assertEqual(
            self.nick(C3, "ann"),
            [
                "*** error: ann is taken; free if its holder stays silent 24s more\n"
                "*** @taken=ann retry=24\n"
            ],
        )
        self.clock.advance(24)
        self.assertEqual(
            self.nick(C3, "ann"),
            [
                "*** ann is now known as guest-3\n",  # the room's notice
                "*** you are now ann\n*** @nick=ann\n",
            ],
        )
        self.assertTrue(self.state.members[A].nick.startswith("guest-"))
        # carl is free for anyone at once: nobody holds it now.
        join(self.state, self.out, B2)
        self.assertEqual(
            self.nick(B2, "carl"), ["*** you are now carl\n*** @nick=carl\n"]
        )

    def test_a_holder_that_speaks_keeps_its_name(self) -> None:
        for _ in range(10):
            self.clock.advance(20)
            say(self.state, self.out, A, "/ping\n")
            self.assertTrue(
                self.nick(C3, "ann")[0].startswith("*** error: ann is taken")
            )
        self.assertEqual(self.state.nicks["ann"].addr, A)
        self.assertEqual(self.state.members[A].nick, "ann")

    def test_the_old_holder_can_take_another_name(self) -> None:
        self.clock.advance(31)
        self.nick(C3, "ann")
        say(self.state, self.out, A, "/nick anne\n")
        lines = self.out.take(A)
        self.assertEqual(lines[0], "*** carl is now known as ann\n")  # the room's
        self.assertTrue(lines[1].startswith("*** while you were silent"), lines)
        self.assertEqual(lines[2], "*** you are now anne\n*** @nick=anne\n")
        self.assertEqual(
            sorted(m.nick for m in self.state.members.values()), ["anne", "ann"][::-1]
        )
