"""
Federation on a real redis-server: two C{twistd -n sockd-chat} nodes, real
UDP members on each (the issue's integration tests).  Skipped when
redis-server is not installed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockd.chat_redis import check, parse_url
from tests.helpers import Daemon

pytestmark = pytest.mark.integration

REDIS = shutil.which("redis-server")

NODE_INI = """
[echo]
enabled = false
[chat]
listen = udp:0:interface=127.0.0.1
validation = false
idle_timeout = 120
rate = 1000
burst = 1000
backend = redis
redis_url = {url}
node_name = {node}
redis_prefix = test:
presence_timeout = 3
[metrics]
enabled = true
listen = tcp:0:interface=127.0.0.1
"""


def connected_gauge(daemon: Daemon) -> str:
    """The node's sockd_chat_redis_connected line from its metrics page."""
    url = f"http://127.0.0.1:{daemon.port('metrics')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as page:
        text: str = page.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("sockd_chat_redis_conn")]
    return line


def need_redis() -> str:
    if REDIS is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return REDIS


def free_port() -> int:
    """A loopback TCP port nobody listens on now (redis refuses --port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """redis-server on 127.0.0.1, no persistence, in a temporary directory."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.extra = list(extra)
        self.binary = need_redis()
        self.port = port or free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="sockd-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--loglevel",
                "notice",
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            bufsize=0,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if not ready:
                continue
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            if b"Ready to accept connections" in seen:
                return self
        self.stop()
        raise AssertionError("redis-server did not start:\n" + seen.decode())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def command(self, *words: str) -> bytes:
        """One command, its first reply line (for checks from a test)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            data = b"*%d\r\n" % len(words)
            for word in words:
                raw = word.encode()
                data += b"$%d\r\n%s\r\n" % (len(raw), raw)
            sock.sendall(data)
            with sock.makefile("rb") as reader:
                return reader.readline()


class ChatClient:
    """A UDP chat member on loopback; every read has a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.server = ("127.0.0.1", port)
        self.seen: list[str] = []

    def send(self, text: str) -> None:
        self.sock.sendto(text.encode() + b"\n", self.server)

    def expect(self, needle: str, timeout: float = 10.0) -> str:
        """Read until a line containing C{needle}; fail with what came."""
        deadline = time.monotonic() + timeout
        for line in self.seen:
            if needle in line:
                self.seen.remove(line)
                return line
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} within {timeout}s: {self.seen}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                if needle in line:
                    return line
                self.seen.append(line)

    def close(self) -> None:
        self.sock.close()


def node(redis: RedisServer, name: str) -> Daemon:
    daemon = Daemon("sockd-chat", NODE_INI.format(url=redis.url, node=name)).start()
    daemon.wait_for("federation: connected to Redis")
    return daemon


def member(daemon: Daemon, nick: str) -> ChatClient:
    client = ChatClient(daemon.port("chat", "UDP"))
    client.send("/hello")
    client.expect("you joined #lobby")
    client.send(f"/nick {nick}")
    client.expect(f"you are now {nick}")
    return client


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


def test_two_nodes_are_one_chat(redis: RedisServer) -> None:
    a, b = node(redis, "a"), node(redis, "b")
    clients: list[ChatClient] = []
    try:
        ann = member(a, "ann")
        bob = member(b, "bob")
        clients += [ann, bob]
        ann.expect("is now known as bob")  # joined as guest-N-M
        # Junk in Redis (a forged notice, a bogus node) reaches no one.
        forged = {"n": "x", "k": "say", "r": "lobby", "f": "*** root", "x": "pwned"}
        redis.command("PUBLISH", "test:events", json.dumps(forged))
        redis.command("HSET", "test:node:zz", "eve", "no good\tlobby")
        redis.command("SADD", "test:nodes", "zz")
        ann.send("hello from a")
        assert bob.expect("hello from a") == "<ann> hello from a"
        bob.send("/me waves")
        assert ann.expect("waves") == "* bob waves"
        # Direct messages, both ways, with the canonical spelling.
        ann.send("/msg BOB psst")
        assert ann.expect("psst") == "[msg -> bob] psst"
        assert bob.expect("psst") == "[msg] <ann> psst"
        # The whole cluster in /who and /rooms.
        bob.send("/join dev")
        bob.expect("you joined #dev")
        bob.send("early bird")
        ann.expect("bob left #lobby")
        # A direct message follows the "entered #dev" event on the same
        # channel: once it is in, node a knows where bob is.
        bob.send("/msg ann ready")
        ann.expect("[msg] <bob> ready")
        ann.send("/rooms")
        rooms = ann.expect("rooms:")
        assert rooms in (
            "*** 2 rooms: #lobby (1), #dev (1)",
            "*** 2 rooms: #dev (1), #lobby (1)",
        ), rooms
        ann.send("/join dev")
        bob.expect("ann joined #dev")
        # #dev is new on node a: its history comes from Redis.
        ann.expect("last 1 messages in #dev")
        assert ann.expect("early bird") == "<bob> early bird"
        ann.send("/who")
        who = ann.expect("*** #dev (2)")
        assert "ann" in who and "bob" in who, who
        # Topics travel, and so does history to a node where a room is new.
        bob.send("/topic federation")
        ann.expect("bob set the topic of #dev: federation")
        # Nicknames are unique across the cluster, ignoring case.
        cat = member(a, "cat")
        clients.append(cat)
        cat.send("/nick BOB")
        assert cat.expect("error") == "*** error: BOB is taken"
        # Terminal safety holds across nodes: ESC never arrives raw.
        ann.send("\x1b[31mred")
        assert bob.expect("red") == "<ann> \ufffd[31mred"
        assert not [line for line in ann.seen + bob.seen if "pwned" in line]
    finally:
        for client in clients:
            client.close()
        a.stop()
        b.stop()


def test_a_dead_node_times_out_and_the_rest_goes_on(redis: RedisServer) -> None:
    a, b = node(redis, "a"), node(redis, "b")
    clients: list[ChatClient] = []
    try:
        ann, amy = member(a, "ann"), member(a, "amy")
        bob = member(b, "bob")
        clients += [ann, amy, bob]
        ann.expect("is now known as bob")
        assert b.process is not None
        b.process.kill()  # no goodbye: only its presence expiring tells
        b.process.wait(10)
        # presence_timeout 3 s, looked at every second
        assert ann.expect("bob", timeout=8) == "*** bob timed out from #lobby"
        amy.expect("bob timed out from #lobby")
        ann.send("still here")
        assert amy.expect("still here") == "<ann> still here"
        # Its nickname claim expired too: someone else may take it.
        amy.send("/nick bob")
        amy.expect("you are now bob")
        assert redis.command("EXISTS", "test:node:b") == b":0\r\n"
    finally:
        for client in clients:
            client.close()
        a.stop()
        b.stop()


def test_redis_lost_and_back_under_load(redis: RedisServer) -> None:
    a, b = node(redis, "a"), node(redis, "b")
    clients: list[ChatClient] = []
    try:
        ann, amy = member(a, "ann"), member(a, "amy")
        bob = member(b, "bob")
        clients += [ann, amy, bob]
        ann.expect("is now known as bob")
        port = redis.port
        redis.stop()
        a.wait_for("lost Redis .* degraded")
        b.wait_for("lost Redis .* degraded")
        assert connected_gauge(a) == 'sockd_chat_redis_connected{service="chat"} 0.0'
        # Local delivery goes on; what cannot reach the cluster is refused
        # plainly, never half-done.
        for i in range(50):
            ann.send(f"local {i}")
        for i in range(50):
            assert amy.expect(f"local {i}") == f"<ann> local {i}"
        amy.send("/nick zed")
        assert "back in touch" in amy.expect("error")
        redis.port = port
        redis.start()
        a.wait_for("presence resynced: 2 members, 2 nicknames, 0 taken", timeout=15)
        b.wait_for("presence resynced: 1 members, 1 nicknames, 0 taken", timeout=15)
        # Presence was resynced: nicknames are claimed again, members are
        # seen across nodes and messages cross again.
        assert redis.command("GET", "test:nick:ann").startswith(b"$")
        assert connected_gauge(a) == 'sockd_chat_redis_connected{service="chat"} 1.0'
        bob.send("/nick ann")
        assert bob.expect("error") == "*** error: ann is taken"
        bob.send("we are back")
        assert ann.expect("we are back") == "<bob> we are back"
        ann.send("/who")
        who = ann.expect("*** #lobby (3)")
        assert "bob" in who and "amy" in who, who
    finally:
        for client in clients:
            client.close()
        a.stop()
        b.stop()


def test_no_redis_at_start_is_a_clear_error() -> None:
    need_redis()
    url = f"redis://127.0.0.1:{free_port()}"
    daemon = Daemon("sockd-chat", NODE_INI.format(url=url, node="a"))
    try:
        daemon.start()
    except AssertionError as e:
        message = str(e)
    else:
        raise AssertionError("the node started without Redis")
    finally:
        code = daemon.stop()
    assert code == 1
    assert f"chat cannot use Redis at {url}/0 ([chat] redis_url)" in message
    assert "Connection refused" in message


def test_the_start_up_probe_authenticates_and_selects() -> None:
    server = RedisServer(None, "--requirepass", "s3cret").start()
    try:
        good = parse_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        first = check(good, "test:")
        assert check(good, "test:") == first + 1  # a new number each start
        bad = parse_url(f"redis://:wrong@127.0.0.1:{server.port}/3")
        with pytest.raises(ValueError, match="AUTH refused"):
            check(bad, "test:")
        with pytest.raises(ValueError, match="INCR refused: NOAUTH"):
            check(parse_url(f"redis://127.0.0.1:{server.port}"), "test:")
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)
