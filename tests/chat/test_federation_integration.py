"""
Federation on a real redis-server: two C{twistd -n sockd-chat} nodes, real
UDP members on each (the issue's integration tests), and a failover under
Redis Sentinel.  Skipped when redis-server (or redis-sentinel) is not
installed.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench import redis_server
from bench.redis_server import free_port
from sockd.chat.redis import Sentinels, check, parse_url
from tests.helpers import Daemon

pytestmark = pytest.mark.integration

REDIS = shutil.which("redis-server")
SENTINEL = shutil.which("redis-sentinel")

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


def need_sentinel() -> str:
    if SENTINEL is None:
        pytest.skip("redis-sentinel is not installed (apt-get install redis-sentinel)")
    return SENTINEL


class RedisServer(redis_server.RedisServer):
    """The shared redis-server runner; the test is skipped without it."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        need_redis()
        super().__init__(port, *extra)


class SentinelServer(RedisServer):
    """
    redis-sentinel on 127.0.0.1 watching one master (quorum 2, down after
    1 s), with its own configuration file: a sentinel rewrites it.
    """

    ready = b"+monitor master"

    def __init__(self, master: RedisServer, name: str = "mymaster") -> None:
        super().__init__(None)
        self.binary = need_sentinel()
        self.config = self.directory / "sentinel.conf"
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {self.directory}",
            "sentinel resolve-hostnames no",
            f"sentinel monitor {name} 127.0.0.1 {master.port} 2",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 2000",
        ]
        if master.password:
            lines.append(f"sentinel auth-pass {name} {master.password}")
        self.config.write_text("\n".join(lines) + "\n")

    def argv(self) -> list[str]:
        return [self.binary, str(self.config)]


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


def node(redis: RedisServer, name: str, ini: str = NODE_INI, **keys: str) -> Daemon:
    daemon = Daemon("sockd-chat", ini.format(url=redis.url, node=name, **keys))
    daemon.start()
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
        assert redis.command("GET", "test:nick:ann") == b"a\tann"
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


# --- Redis Sentinel ------------------------------------------------------

PASSWORD = "s3cret"

SENTINEL_INI = NODE_INI.replace(
    "redis_url = {url}",
    f"redis_url = redis://:{PASSWORD}@/0\n"
    "redis_sentinels = {sentinels}\n"
    "redis_master = mymaster",
)


def wait_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll C{condition} until it holds; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.05)


def answers(server: RedisServer, *words: str) -> Any:
    try:
        return server.command(*words)
    except OSError:
        return None  # not listening yet


@pytest.fixture
def sentinels() -> Iterator[tuple[RedisServer, RedisServer, list[SentinelServer]]]:
    """A master, its replica and three sentinels agreeing on both."""
    need_redis()
    need_sentinel()
    auth = ("--requirepass", PASSWORD, "--masterauth", PASSWORD)
    fast = ("--repl-diskless-sync-delay", "0")
    servers: list[RedisServer] = []
    try:
        master = RedisServer(None, *auth, *fast)
        servers.append(master)
        master.start()
        replica = RedisServer(None, *auth, "--replicaof", "127.0.0.1", str(master.port))
        servers.append(replica)
        replica.start()
        wait_until(
            lambda: b"master_link_status:up" in replica.command("INFO", "replication"),
            "replica in sync",
            15,
        )
        # Started once the replica is in sync: each sees it at once.
        watchers = [SentinelServer(master) for _ in range(3)]
        servers += watchers
        for watcher in watchers:
            watcher.start()

        def agreed() -> bool:
            for watcher in watchers:
                quorum = answers(watcher, "SENTINEL", "CKQUORUM", "mymaster")
                replicas = answers(watcher, "SENTINEL", "REPLICAS", "mymaster")
                if not (quorum or b"").startswith(b"+OK 3 usable") or not replicas:
                    return False
            return True

        wait_until(agreed, "three sentinels agreeing, each seeing the replica", 20)
        yield master, replica, watchers
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.directory, ignore_errors=True)


def test_a_failover_keeps_the_chat_and_its_nicknames(
    sentinels: tuple[RedisServer, RedisServer, list[SentinelServer]],
) -> None:
    master, replica, watchers = sentinels
    where = tuple(("127.0.0.1", watcher.port) for watcher in watchers)
    # The start-up probe finds the master through the sentinels.
    dead = ("127.0.0.1", free_port())
    first = check(Sentinels((dead, *where), "mymaster", PASSWORD, 0), "test:")
    assert check(Sentinels(where, "mymaster", PASSWORD, 0), "test:") == first + 1
    with pytest.raises(ValueError, match="monitors no master called other"):
        check(Sentinels(where[:1], "other", PASSWORD, 0), "test:")
    listed = " ".join(f"{host}:{port}" for host, port in where)
    a = node(master, "a", SENTINEL_INI, sentinels=listed)
    b = node(master, "b", SENTINEL_INI, sentinels=listed)
    clients: list[ChatClient] = []
    try:
        a.wait_for(f"master mymaster is at 127.0.0.1:{master.port}")
        ann = member(a, "ann")
        bob = member(b, "bob")
        clients += [ann, bob]
        ann.expect("is now known as bob")
        ann.send("before")
        assert bob.expect("before") == "<ann> before"
        assert master.process is not None
        master.process.kill()
        killed = time.monotonic()
        master.process.wait(10)
        # A member of a speaks until one on b hears: the gap in delivery.
        deadline = killed + 30
        switched = gap = None
        sent = 0
        while gap is None:
            assert time.monotonic() < deadline, (
                f"nothing crossed nodes within 30 s of the master's death "
                f"(sentinels switched after {switched} s)\n{a.log()}\n{b.log()}"
            )
            ann.send(f"after {sent}")
            sent += 1
            if switched is None:
                said = answers(
                    watchers[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"
                )
                if said == [b"127.0.0.1", str(replica.port).encode()]:
                    switched = round(time.monotonic() - killed, 2)
            try:
                bob.expect("<ann> after", timeout=0.1)
            except AssertionError:
                continue
            gap = round(time.monotonic() - killed, 2)
        print(f"failover: sentinels switched after {switched} s, chat gap {gap} s")
        # Both nodes are on the new master, presence resynced.
        for daemon in (a, b):
            daemon.wait_for(
                f"master mymaster is at 127.0.0.1:{replica.port} "
                f"\\(was 127.0.0.1:{master.port}\\)"
            )
            daemon.wait_for("presence resynced")
        # ann's claim is on the new master: b refuses the name.
        assert replica.command("GET", "test:nick:ann") == b"a\tann"
        bob.send("/nick ANN")
        assert bob.expect("error") == "*** error: ANN is taken"
        bob.send("both ways")
        assert ann.expect("both ways") == "<bob> both ways"
    finally:
        for client in clients:
            client.close()
        a.stop()
        b.stop()


def test_no_sentinel_at_start_is_a_clear_error() -> None:
    need_redis()
    ports = [free_port(), free_port()]
    listed = " ".join(f"127.0.0.1:{port}" for port in ports)
    ini = SENTINEL_INI.format(url="", node="a", sentinels=listed)
    daemon = Daemon("sockd-chat", ini)
    try:
        daemon.start()
    except AssertionError as e:
        message = str(e)
    else:
        raise AssertionError("the node started without a sentinel")
    finally:
        code = daemon.stop()
    assert code == 1
    assert (
        f"chat cannot use Redis master mymaster via sentinels {listed} "
        "([chat] redis_sentinels, redis_master): no sentinel gave the address "
        f"of master mymaster: 127.0.0.1:{ports[0]}: [Errno 111] Connection "
        f"refused; 127.0.0.1:{ports[1]}: [Errno 111] Connection refused"
    ) in message
