"""
Chat federation benchmark: two twistd sockd-chat nodes on one private
redis-server, 1,000 members in one room (half on each node).  One member
on node A talks; the members on A get same-node delivery, the ones on B
cross-node delivery (A -> Redis -> B), from the same messages.

    python -m bench.chat_federation [--members N] [--rates R,R,..] [--seconds S]

At each rate (messages a second, for S seconds), per group: the share
delivered, datagrams delivered a second, and the latency from send to
receipt (median, p99).  The members' side is one Python process reading
1,000 sockets: compare the groups, and rates, more than absolute figures.
(Flooding without a rate limit only measures an overloaded node: the
per-member rate limit stops that in practice.)
"""

from __future__ import annotations

import argparse
import re
import selectors
import shutil
import socket
import statistics
import sys
import time

from bench import Server, raise_nofile, sockd_daemon
from bench.chat import drain
from bench.redis_server import RedisServer

NODE_INI = """\
    [echo]
    enabled = false
    [chat]
    listen = udp:0:interface=127.0.0.1
    idle_timeout = 86400
    history = 0
    max_members = 20000
    max_members_per_ip = 20000
    max_room_members = 20000
    rate = 1000000
    burst = 1000000
    total_output_rate = 1000000000
    validation = false
    backend = redis
    redis_url = {url}
    node_name = {node}
    presence_timeout = 30
"""

SEQ = re.compile(rb"^<[^>]+> seq (\d+) ")


def node(redis: RedisServer, name: str) -> Server:
    ini = NODE_INI.format(url=redis.url, node=name)
    server = sockd_daemon(f"node-{name}", "sockd-chat", ini).start()
    deadline = time.monotonic() + 20
    while not any("connected to Redis" in line for line in server.lines):
        if time.monotonic() > deadline:
            raise RuntimeError(
                "node did not connect to Redis:\n" + "\n".join(server.lines)
            )
        with server._changed:
            server._changed.wait(0.5)
    return server


def member(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * 1024)
    s.bind(("127.0.0.1", 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(5.0)
    s.send(b"/hello\n")
    for _ in range(100_000):
        if s.recv(4096).startswith(b"*** welcome, you are"):
            return s
    raise RuntimeError("no welcome")


def run(
    sender: socket.socket,
    groups: dict[str, list[socket.socket]],
    rate: float | None,
    seconds: float,
) -> dict[str, tuple[int, list[float], float, float]]:
    """Send for C{seconds}; per group: (received, latencies, first, last)."""
    selector = selectors.DefaultSelector()
    for name, sockets in groups.items():
        for s in sockets:
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ, name)
    sent: list[float] = []
    got: dict[str, list[float]] = {name: [] for name in groups}
    latency: dict[str, list[float]] = {name: [] for name in groups}
    start = time.perf_counter()
    stop = start + seconds
    quiet_until = stop + 1.0
    pad = b"x" * 16
    try:
        while True:
            now = time.perf_counter()
            if now < stop and (rate is None or len(sent) < (now - start) * rate):
                sender.send(b"seq %d %s\n" % (len(sent), pad))
                sent.append(now)
                if rate is None and len(sent) % 8:
                    continue  # a few at a time, then read
            elif now >= quiet_until:
                break
            wait = 0.0 if rate is None else max(0.0, start + len(sent) / rate - now)
            ready = selector.select(min(wait, 0.2) if now < stop else 0.2)
            if not ready and now >= stop:
                break
            for key, _ in ready:
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                name = key.data
                try:
                    for _ in range(1000):
                        data = sock.recv(4096)
                        when = time.perf_counter()
                        match = SEQ.match(data)
                        if match:
                            got[name].append(when)
                            latency[name].append(when - sent[int(match.group(1))])
                except BlockingIOError:
                    pass
            if now >= stop and ready:
                quiet_until = time.perf_counter() + 0.5
    finally:
        selector.close()
    out = {}
    for name in groups:
        times = got[name]
        out[name] = (
            len(times),
            latency[name],
            start,
            max(times) if times else start,
        )
    out["_sent"] = (len(sent), [], start, stop)
    return out


def report(
    title: str,
    result: dict[str, tuple[int, list[float], float, float]],
    sizes: dict[str, int],
) -> None:
    sent = result["_sent"][0]
    print(f"\n{title}: {sent} messages sent")
    print("group        members  delivered   share      per s   p50 ms   p99 ms")
    for name, size in sizes.items():
        count, lat, first, last = result[name]
        share = count / (sent * size) if sent else 0.0
        per_s = count / (last - first) if last > first else 0.0
        lat_ms = sorted(x * 1000 for x in lat)
        p50 = statistics.median(lat_ms) if lat_ms else float("nan")
        p99 = lat_ms[int(len(lat_ms) * 0.99)] if lat_ms else float("nan")
        print(
            f"{name:<12} {size:>7} {count:>10} {share:>7.1%} {per_s:>10.0f} "
            f"{p50:>8.2f} {p99:>8.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--rates", default="20,100,200,400")
    parser.add_argument("--seconds", type=float, default=3.0)
    opts = parser.parse_args()
    raise_nofile()
    redis = RedisServer().start()
    a = b = None
    sockets: list[socket.socket] = []
    try:
        a, b = node(redis, "a"), node(redis, "b")
        half = opts.members // 2
        sender = member(a.ports["udp"])
        same = [member(a.ports["udp"]) for _ in range(half - 1)]
        cross = [member(b.ports["udp"]) for _ in range(opts.members - half)]
        sockets = [sender, *same, *cross]
        drain(sockets, 0.5)
        groups = {"same-node": same, "cross-node": cross}
        sizes = {name: len(group) for name, group in groups.items()}
        for rate in (float(r) for r in opts.rates.split(",")):
            report(
                f"{rate:g} messages/s",
                run(sender, groups, rate, opts.seconds),
                sizes,
            )
            drain(sockets, 0.5)
    finally:
        for s in sockets:
            s.close()
        for server in (a, b):
            if server is not None:
                server.stop()
        redis.stop()
        shutil.rmtree(redis.directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
