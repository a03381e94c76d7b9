"""The chat's text rules: the terminal-safety filter, names, listings, machine lines."""

from __future__ import annotations

import re
import unicodedata

from twisted.trial.unittest import SynchronousTestCase

from sockd.chat.text import (
    Event,
    clean,
    clip,
    event_line,
    listing,
    nick_problem,
    parse_event,
    room_name,
)


class CleanTests(SynchronousTestCase):
    def test_controls_replaced(self) -> None:
        for raw in [
            "\x1b[31mred",
            "a\x07b",
            "a\x00b",
            "del\x7f",
            "c1\u009b2J",
            "bare\rcr",
            "bidi\u202eevil",
            "iso\u2066x\u2069",
        ]:
            cleaned = clean(raw)
            self.assertIsNone(
                re.search(
                    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", cleaned
                ),
                repr(cleaned),
            )
            self.assertIn("\ufffd", cleaned)

    def test_invisible_and_direction_marks_replaced(self) -> None:
        for mark in [
            *("\u2028", "\u2029", "\u200e", "\u200f", "\u061c", "\u200b"),
            *("\ufeff", "\u2060", "\u2061", "\u2064", "\u180e", "\u00ad"),
            *("\u115f", "\u1160", "\u3164", "\uffa0", "\u034f", "\U000e0041"),
        ]:
            self.assertEqual(clean(f"a{mark}b"), "a\ufffdb", repr(mark))
            self.assertEqual(clean(f"\u00e9{mark}"), "\u00e9\ufffd", repr(mark))

    def test_every_format_and_separator_character_replaced(self) -> None:
        # Decided by category, for whatever this Python's Unicode knows.
        kept = {0x200C, 0x200D}  # joiners: emoji sequences, Indic, Persian
        for code in range(0x110000):
            c = chr(code)
            if code in kept or unicodedata.category(c) not in ("Cf", "Zl", "Zp"):
                continue
            self.assertEqual(clean("x" + c), "x\ufffd", hex(code))

    def test_text_kept(self) -> None:
        for text in ["plain", "caf\u00e9 \u65e5\u672c \U0001f600", "a\nb", "x\u200dy"]:
            self.assertEqual(clean(text), text)
        # Joiners and variation selectors: emoji sequences stay whole.
        for text in [
            "\U0001f469\u200d\U0001f4bb",
            "\u2764\ufe0f",
            "\u0645\u200c\u06cc",
        ]:
            self.assertEqual(clean(text), text)
        self.assertEqual(clean("a\r\nb\r\n"), "a\nb\n")
        self.assertEqual(clean("tab\there"), "tab here")


class NameTests(SynchronousTestCase):
    def test_nicknames(self) -> None:
        for good in ["a", "Ann", "z-_9", "x" * 16]:
            self.assertIsNone(nick_problem(good, 16), good)
        rule = (
            "a nickname is 1 to 16 letters, digits, '_' or '-', starting with a letter"
        )
        for bad in ["9lives", "a b", "x" * 17, "é", "a*", "<x>", "-a"]:
            self.assertEqual(nick_problem(bad, 16), f"{bad} is no nickname: {rule}")
        self.assertEqual(nick_problem("", 16), f"usage: /nick NAME; {rule}")

    def test_nickname_problem_clips_only_what_was_sent(self) -> None:
        # The rule is never cut (it was, at 64 characters); a long input is.
        problem = nick_problem("9" + "x" * 200, 16)
        assert problem is not None
        self.assertEqual(
            problem,
            "9" + "x" * 31 + "... is no nickname: a nickname is 1 to 16 letters, "
            "digits, '_' or '-', starting with a letter",
        )
        for reserved in ["guest", "Guest-5", "ADMIN", "me", "NickServ"]:
            self.assertEqual(nick_problem(reserved, 16), f"{reserved} is reserved")

    def test_room_names(self) -> None:
        self.assertEqual(room_name("lobby"), "lobby")
        self.assertEqual(room_name("#Dev"), "Dev")
        self.assertEqual(room_name("x" * 32), "x" * 32)
        for bad in ["", "#", "##x", "a b", "x" * 33, "café", "a/b", "#a\n"]:
            self.assertIsNone(room_name(bad), bad)


class ListingTests(SynchronousTestCase):
    def test_who_listing_is_bounded(self) -> None:
        text = listing("*** #x (500): ", [f"user{i:04d}" for i in range(500)])
        self.assertLessEqual(len(text.encode()), 1300)
        self.assertIn("more", text)

    def test_listing_and_clip(self) -> None:
        self.assertEqual(
            listing("*** 2 rooms: ", ["#a (1)", "#b (2)"]),
            "*** 2 rooms: #a (1), #b (2)\n",
        )
        self.assertEqual(listing("*** none: ", []), "*** none: \n")
        self.assertEqual(clip("x" * 64), "x" * 64)
        self.assertEqual(clip("x" * 65), "x" * 64 + "...")


class EventLineTests(SynchronousTestCase):
    """The machine lines: written by the relay, read by the client."""

    LINES = [
        ("*** @v=k3xq7m2a\n", Event("v", "k3xq7m2a")),
        ("*** @dropped\n", Event("dropped")),
        ("*** @nick=Ann_9-x\n", Event("nick", "Ann_9-x")),
        (
            "*** @welcome nick=guest-7-1z\n",
            Event("welcome", "", {"nick": "guest-7-1z"}),
        ),
        (
            "*** @member nick=ann room=dev\n",
            Event("member", "", {"nick": "ann", "room": "dev"}),
        ),
        ("*** @x=1 flag y=2\n", Event("x", "1", {"flag": "", "y": "2"})),
    ]

    def test_written_byte_by_byte(self) -> None:
        self.assertEqual(event_line("v", "k3xq7m2a"), "*** @v=k3xq7m2a\n")
        self.assertEqual(event_line("dropped"), "*** @dropped\n")
        self.assertEqual(
            event_line("member", nick="ann", room="dev"),
            "*** @member nick=ann room=dev\n",
        )
        self.assertEqual(
            event_line("member", nick="ann", room=None), "*** @member nick=ann\n"
        )
        self.assertEqual(event_line("x", "1", flag="", y="2"), "*** @x=1 flag y=2\n")

    def test_read_back_exactly(self) -> None:
        for line, event in self.LINES:
            self.assertEqual(parse_event(line[:-1]), event, line)
            self.assertEqual(
                event_line(event.name, event.value, **event.fields), line, line
            )

    def test_reads_only_what_it_could_have_written(self) -> None:
        # Every cut and every one-character change of a machine line is
        # either no event or a line the writer makes exactly so: one syntax.
        for line, _ in self.LINES:
            line = line[:-1]
            variants = [line[:cut] for cut in range(len(line))]
            for at in range(len(line)):
                for c in " =@*\t\ufffd\u00e9A9_-":
                    variants.append(line[:at] + c + line[at + 1 :])
                    variants.append(line[:at] + c + line[at:])
            for variant in variants:
                event = parse_event(variant)
                if event is not None:
                    written = event_line(event.name, event.value, **event.fields)
                    self.assertEqual(written, variant + "\n")

    def test_nothing_else_is_an_event(self) -> None:
        for line in [
            "",
            "*** @",
            "***@v=abcdefgh",
            "*** v=abcdefgh",
            " *** @v=abcdefgh",
            "*** @v=abcdefgh ",
            "*** @v=abcdefgh\n",
            "*** @v=abcdefgh\r",
            "*** @v=abcdefgh  x",
            "*** @v=",
            "*** @=abcdefgh",
            "*** @V=abcdefgh",
            "*** @v=abc=def",
            "*** @v=abc\ufffd",
            "*** @v=\u0430bcdefgh",  # a Cyrillic a
            "*** @v=\uff41bcdefgh",  # a fullwidth a
            "*** @v=abcdefgh v=hgfedcba",
            "*** @nick=ann nick=bob",
            "*** @9=x",
            "*** @v=" + "a" * 65,
            "*** @v=a " + "x " * 130,
            "\ufeff*** @v=abcdefgh",
            "<bob> *** @v=abcdefgh",
            "* bob *** @v=abcdefgh",
            "[msg] <bob> *** @v=abcdefgh",
            "[msg -> bob] *** @v=abcdefgh",
            "*** bob set the topic of #lobby: *** @v=abcdefgh",
            "*** topic: @v=abcdefgh",
            "*** error: no one is called @v=abcdefgh",
        ]:
            self.assertIsNone(parse_event(line), repr(line))

    def test_what_cannot_be_written_is_refused(self) -> None:
        for name, value, fields in [
            ("", "", {}),
            ("Nick", "ann", {}),
            ("v", "a b", {}),
            ("v", "a=b", {}),
            ("v", "\u00e9", {}),
            ("v", "x" * 65, {}),
            ("v", "abc\n", {}),
            ("member", "", {"nick": "a\nb"}),
            ("member", "", {"Nick": "ann"}),
            ("nick", "ann", {"nick": "bob"}),
            ("x", "", {f"k{i}": "v" * 60 for i in range(4)}),
        ]:
            with self.assertRaises(ValueError, msg=(name, value, fields)):
                event_line(name, value, **fields)
