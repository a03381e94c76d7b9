"""
A real C{twistd -n sockd-chat} on loopback, with real clients: C{nc -u},
C{socat}, the C{sockd chat} client (stdin from a pipe) and plain sockets.
"""

from __future__ import annotations

import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from tests.helpers import need, running

pytestmark = pytest.mark.integration

TOKEN = re.compile(r"/v ([a-z2-7]{8})\b")

INI = """
[echo]
enabled = false
[chat]
listen = udp:{port}:interface=127.0.0.1
idle_timeout = {idle}
rate = 50
burst = 50
"""


class Peer:
    """A line-based process: lines in through stdin, lines out collected."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            for line in raw.decode("utf-8", "replace").splitlines():
                self.lines.put(line)

    def say(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def expect(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.seen:
            match = regex.search(line)
            if match:
                self.seen.remove(line)
                return match
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout}s: {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            match = regex.search(line)
            if match:
                return match
            self.seen.append(line)

    def drain(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)


@contextmanager
def peers(*argvs: Sequence[str]) -> Iterator[list[Peer]]:
    started = [Peer(argv) for argv in argvs]
    try:
        yield started
    finally:
        for peer in started:
            peer.stop()


def validate_by_hand(peer: Peer, nick: str) -> None:
    """What a person on nc -u does: say something, send back the cookie."""
    peer.say("hello there, I would like to chat please")
    token = peer.expect(r"^\*\*\* welcome to sockd chat.*" + TOKEN.pattern)
    peer.say(f"/v {token.group(1)}")
    peer.expect(r"^\*\*\* you joined #lobby")
    peer.say(f"/nick {nick}")
    peer.expect(rf"^\*\*\* you are now {nick}$")


def udp(source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.settimeout(2.0)
    return s


def sockd_chat(port: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sockd.client.main",
        "chat",
        f"127.0.0.1:{port}",
        "--no-timestamps",
        *args,
    ]


def test_three_people_talk_one_times_out_flood_harmless() -> None:
    nc, socat = need("nc"), need("socat")
    with running("sockd-chat", INI.format(port=0, idle=4)) as daemon:
        port = daemon.port("chat", "UDP")
        with peers(
            [nc, "-u", "127.0.0.1", str(port)],
            [socat, "-", f"UDP:127.0.0.1:{port}"],
            sockd_chat(port, "--nick", "carol", "--keepalive", "0.5"),
        ) as (ann, bob, carol):
            carol.expect(r"^\*\*\* you are now carol$")
            validate_by_hand(ann, "ann")
            validate_by_hand(bob, "bob")
            quiet = udp()
            quiet.sendto(
                b"/hello and some padding to get the welcome", ("127.0.0.1", port)
            )
            token = TOKEN.search(quiet.recv(2000).decode())
            assert token is not None
            quiet.sendto(
                f"/v {token.group(1)}\n/nick quiet\n".encode(), ("127.0.0.1", port)
            )

            # in the room
            ann.say("hi all, from nc")
            bob.expect(r"^<ann> hi all, from nc$")
            carol.expect(r"^<ann> hi all, from nc$")
            carol.say("hello from the sockd client")
            ann.expect(r"^<carol> hello from the sockd client$")
            bob.expect(r"^<carol> hello from the sockd client$")

            # a direct message reaches only its addressee
            bob.say("/msg Carol just between us")
            carol.expect(r"^\[msg\] <bob> just between us$")
            bob.expect(r"^\[msg -> carol\] just between us$")

            # a spoofed-source flood from other addresses: never amplified,
            # and the conversation goes on
            ann.say("/ping")  # nc and socat users keep their place by hand
            bob.say("/ping")
            ann.expect(r"^\*\*\* pong$")
            bob.expect(r"^\*\*\* pong$")
            flooders = [udp("127.0.0.2"), udp("127.0.0.3")]
            sent = dict.fromkeys(range(2), 0)
            got = dict.fromkeys(range(2), 0)
            payloads = [
                b"/help",
                b"/who",
                b"hi",
                b"x" * 40,
                b"y" * 1000,
                b"/v zzzzzzzz",
            ]
            for i in range(1500):
                data = payloads[i % len(payloads)]
                flooders[i % 2].sendto(data, ("127.0.0.1", port))
                sent[i % 2] += len(data)
            ann.say("still talking during the flood")
            bob.expect(r"^<ann> still talking during the flood$")
            carol.expect(r"^<ann> still talking during the flood$")
            for n, s in enumerate(flooders):
                s.settimeout(0.5)
                while True:
                    try:
                        got[n] += len(s.recv(70000))
                    except TimeoutError:
                        break
                assert 0 < got[n] <= 3 * sent[n], (got, sent)
                s.close()

            # the silent one times out; the others keep their place
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                ann.say("/ping")
                bob.say("/ping")
                try:
                    ann.expect(r"^\*\*\* quiet timed out from #lobby$", timeout=0.5)
                    break
                except AssertionError:
                    continue
            else:
                raise AssertionError("quiet never timed out")
            bob.expect(r"^\*\*\* quiet timed out from #lobby$")
            for _ in range(20):
                if b"you were dropped" in quiet.recv(2000):
                    break
            else:
                raise AssertionError("quiet was not told it was dropped")
            quiet.close()
            ann.say("/who")
            who = ann.expect(r"^\*\*\* #lobby \(3\): (.*)$").group(1)
            assert sorted(who.split(", ")) == ["ann", "bob", "carol"]

            # the piped client leaves a moment after its input ends
            assert carol.process.stdin is not None
            carol.process.stdin.close()
            assert carol.process.wait(10) == 0
            ann.expect(r"^\*\*\* carol quit #lobby$")
            assert "[msg] <bob> just between us" not in "\n".join(ann.drain())
    assert "\x1b" not in daemon.log()


def test_one_datagram_client_gets_a_useful_reply() -> None:
    # The tutorial's client: one datagram out, one back.
    with running("sockd-chat", INI.format(port=0, idle=60)) as daemon:
        port = daemon.port("chat", "UDP")
        s = udp()
        s.sendto(b"Hello, server! Is this the chat?", ("127.0.0.1", port))
        reply = s.recv(2000).decode()
        assert reply.startswith("*** welcome to sockd chat")
        assert TOKEN.search(reply)
        assert len(reply.encode()) <= 3 * len(b"Hello, server! Is this the chat?")
        s.close()


def test_client_rejoins_after_server_restart() -> None:
    probe = udp()
    port = probe.getsockname()[1]
    probe.close()  # a port that was free a moment ago
    ini = INI.format(port=port, idle=60)
    with peers(
        sockd_chat(port, "--nick", "phoenix", "--room", "ashes", "--keepalive", "0.3")
    ) as (client,):
        with running("sockd-chat", ini):
            client.expect(r"^\*\*\* you joined #ashes")
        with running("sockd-chat", ini):
            # It answers the new server's join prompt (not shown) by itself.
            client.expect(r"^\*\*\* welcome, you are guest-1\.", timeout=10)
            client.expect(r"^\*\*\* you joined #ashes", timeout=5)
            for line in client.drain():
                assert "/v " not in line and not line.startswith("*** @"), line
            s = udp()
            s.sendto(b"/hello and padding for a full welcome", ("127.0.0.1", port))
            token = TOKEN.search(s.recv(2000).decode())
            assert token is not None
            s.sendto(
                f"/v {token.group(1)}\n/join ashes\n/who\n".encode(),
                ("127.0.0.1", port),
            )
            for _ in range(10):
                line = s.recv(2000).decode()
                if line.startswith("*** #ashes"):
                    assert "phoenix" in line
                    break
            else:
                raise AssertionError("no /who answer")
            s.close()


def test_nc_killed_and_restarted_takes_back_its_nickname() -> None:
    # Ctrl-C on nc -u says nothing to the server, and the new nc has a new
    # source port: the same host takes its name back (nick_reclaim 0 here,
    # so the test need not wait), another host does not (nick_grace 60).
    nc = need("nc")
    ini = INI.format(port=0, idle=60) + "nick_reclaim = 0\nnick_grace = 60\n"
    with running("sockd-chat", ini) as daemon:
        port = daemon.port("chat", "UDP")
        other = udp("127.0.0.2")
        other.sendto(b"/hello and some padding to get the welcome", ("127.0.0.1", port))
        token = TOKEN.search(other.recv(2000).decode())
        assert token is not None
        other.sendto(f"/v {token.group(1)}\n".encode(), ("127.0.0.1", port))
        with peers([nc, "-u", "127.0.0.1", str(port)]) as (first,):
            validate_by_hand(first, "ann")
            first.process.kill()  # as Ctrl-C: no /quit
        with peers([nc, "-u", "127.0.0.1", str(port)]) as (second,):
            validate_by_hand(second, "ann")
            second.say("/hello")
            second.expect(r"^\*\*\* you are ann in #lobby$")
        other.sendto(b"/nick ann\n", ("127.0.0.1", port))
        for _ in range(10):
            line = other.recv(2000).decode()
            if "error" in line:
                assert line.startswith("*** error: ann is taken; free if its holder"), (
                    line
                )
                break
        else:
            raise AssertionError("no answer to /nick ann")
        other.close()
