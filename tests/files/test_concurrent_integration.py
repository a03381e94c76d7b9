"""
Integration test: a real C{twistd -n sockd-file} sending many file bodies
at once with sendfile, as the reactor holds back and cancels the writer
removals of each wake (L{sockd.core.epoll}).
"""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import running

pytestmark = pytest.mark.integration

SIZE = 3 * 1024 * 1024 + 7
STREAMS = 40


def test_concurrent_downloads_identical(tmp_path: Path) -> None:
    """
    40 bare downloads and 8 keep-alive connections asking twice each, all
    at once from one client loop: every body arrives whole and identical,
    and every byte went out with sendfile.
    """
    root = tmp_path / "root"
    root.mkdir()
    body = os.urandom(SIZE)
    (root / "big.bin").write_bytes(body)
    (root / "small.txt").write_bytes(b"small\n")
    ini = f"""
    [echo]
    enabled = false
    [file]
    listen = tcp:0:interface=127.0.0.1
    root = {root}
    max_connections_per_ip = 200
    [metrics]
    enabled = true
    listen = tcp:0:interface=127.0.0.1
    """
    bare = b"big.bin\n"
    framed = b"GET big.bin\nGET small.txt\nGET big.bin\nQUIT\n"
    with running("sockd-file", ini) as d:
        port = d.port("file")
        selector = selectors.DefaultSelector()
        received: dict[socket.socket, bytearray] = {}
        for request in [bare] * STREAMS + [framed] * 8:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(request)
            s.setblocking(False)
            received[s] = bytearray()
            selector.register(s, selectors.EVENT_READ, request)
        deadline = time.monotonic() + 60
        open_ = len(received)
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                chunk = s.recv(1 << 20)
                if chunk:
                    received[s] += chunk
                else:
                    selector.unregister(s)
                    s.close()
                    open_ -= 1
        selector.close()
        for s in received:
            s.close()
        assert open_ == 0, f"{open_} downloads unfinished after 60 s"
        url = f"http://127.0.0.1:{d.port('metrics')}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    digest = hashlib.sha256(body).hexdigest()
    results = [bytes(r) for r in received.values()]
    plain = results[:STREAMS]
    assert [hashlib.sha256(r).hexdigest() for r in plain] == [digest] * STREAMS
    for answer in results[STREAMS:]:
        head, _, rest = answer.partition(b"\r\n")
        assert head.startswith(b"OK %d size=%d " % (SIZE, SIZE))
        assert rest[:SIZE] == body
        head, _, rest = rest[SIZE:].partition(b"\r\n")
        assert head.startswith(b"OK 6 ")
        assert rest[:6] == b"small\n"
        head, _, rest = rest[6:].partition(b"\r\n")
        assert rest[:SIZE] == body
        assert rest[SIZE:] == b"OK bye\r\n"
    samples = {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("sockd_file_")
    }
    total = (STREAMS + 16) * SIZE + 8 * 6
    assert samples["sockd_file_sendfile_bytes"] == total
