"""
PROXY protocol listeners behind a real HAProxy (and nginx, where its stream
module is installed), configured with the blocks of docs/deploy.md.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docblocks import block_holding
from tests.helpers import ROOT, Daemon, free_port_pair, need, run_tool, tcp_exchange

pytestmark = pytest.mark.integration

DEPLOY = ROOT / "docs" / "deploy.md"
NODE = """
    [sockd]
    trusted_proxies = 127.0.0.1/32
    deny = 127.0.0.4
    [echo]
    listen = haproxy:tcp:0:interface=127.0.0.1 tcp:0:interface=127.0.0.1
    listen_udp =
    max_connections_per_ip = 1
"""
NGINX_STREAM = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Until something accepts on 127.0.0.1:PORT (bounded in time)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[Daemon]]:
    started = [Daemon("sockd-echo", NODE) for _ in range(2)]
    try:
        yield [node.start() for node in started]
    finally:
        for node in started:
            node.stop()


@pytest.fixture(scope="module")
def haproxy(nodes: list[Daemon]) -> Iterator[int]:
    binary = need("haproxy")
    front = free_port_pair()
    config = block_holding(DEPLOY, "send-proxy-v2").source
    config = config.replace("127.0.0.1:7000", f"127.0.0.1:{front}")
    config = config.replace("127.0.0.1:9000", f"127.0.0.1:{nodes[0].port('echo')}")
    config = config.replace("127.0.0.1:9010", f"127.0.0.1:{nodes[1].port('echo')}")
    path = Path(tempfile.mkdtemp(prefix="sockd-haproxy-")) / "haproxy.cfg"
    path.write_text(config)
    process = start([binary, "-db", "-f", str(path)])
    try:
        wait_listening(front)
        yield front
    finally:
        stop(process)


def node_direct(node: Daemon) -> int:
    return node.port("echo", index=1)


def test_nc_through_haproxy_gets_the_same_bytes(
    nodes: list[Daemon], haproxy: int
) -> None:
    nc = need("nc")
    data = b"hello\nworld \xc3\xa9\n"
    direct = run_tool([nc, "-N", "127.0.0.1", str(node_direct(nodes[0]))], data)
    proxied = run_tool([nc, "-N", "127.0.0.1", str(haproxy)], data)
    assert direct.stdout == "HELLO\nWORLD \xc9\n".encode()
    assert proxied.stdout == direct.stdout


def test_clients_counted_and_limited_apart(nodes: list[Daemon], haproxy: int) -> None:
    with socket.create_connection(
        ("127.0.0.1", haproxy), timeout=5, source_address=("127.0.0.2", 0)
    ) as held:
        held.sendall(b"a\n")
        assert held.recv(100) == b"A\n"
        # Its second connection: over max_connections_per_ip = 1 ...
        refused = tcp_exchange(haproxy, b"b\n", source="127.0.0.2")
        assert refused == b"ERR too many connections from your address\r\n"
        # ... while another client behind the same proxy is served.
        assert tcp_exchange(haproxy, b"c\n", source="127.0.0.3") == b"C\n"
    logs = "\n".join(node.log() for node in nodes)
    assert "refused 127.0.0.2: too many connections from your address" in logs


def test_access_list_sees_the_client_behind_haproxy(
    nodes: list[Daemon], haproxy: int
) -> None:
    assert tcp_exchange(haproxy, b"x\n", source="127.0.0.4") == b"ERR access denied\r\n"


def test_header_from_an_untrusted_address_refused(nodes: list[Daemon]) -> None:
    header = b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\nhi\n"
    port = nodes[0].port("echo")
    answer = tcp_exchange(port, header, source="127.0.0.2")
    assert answer == b"ERR PROXY header from an address not in trusted_proxies\r\n"
    # The proxy's own address without a header: refused too.
    answer = tcp_exchange(port, b"hi\n")
    assert answer == b"ERR a trusted proxy sent no PROXY header\r\n"
    nodes[0].wait_for("refused 127.0.0.1: a trusted proxy sent no PROXY header")


def test_nginx_stream_example(nodes: list[Daemon]) -> None:
    binary = need("nginx")
    if (
        not NGINX_STREAM.exists()
        and "--with-stream " not in run_tool([binary, "-V"]).stderr.decode()
    ):
        pytest.skip(f"nginx has no stream module ({NGINX_STREAM}: libnginx-mod-stream)")
    front = free_port_pair()
    block = block_holding(DEPLOY, "proxy_protocol on").source
    block = block.replace("127.0.0.1:7001", f"127.0.0.1:{front}")
    block = block.replace("127.0.0.1:9000", f"127.0.0.1:{nodes[0].port('echo')}")
    directory = Path(tempfile.mkdtemp(prefix="sockd-nginx-"))
    load = f"load_module {NGINX_STREAM};\n" if NGINX_STREAM.exists() else ""
    (directory / "nginx.conf").write_text(
        f"{load}daemon off;\npid {directory}/nginx.pid;\n"
        f"error_log stderr;\nevents {{}}\n{block}"
    )
    process = start([binary, "-p", str(directory), "-c", str(directory / "nginx.conf")])
    try:
        wait_listening(front)
        assert tcp_exchange(front, b"via nginx\n", source="127.0.0.3") == b"VIA NGINX\n"
        assert (
            tcp_exchange(front, b"x\n", source="127.0.0.4") == b"ERR access denied\r\n"
        )
    finally:
        stop(process)
    assert re.search(r"127\.0\.0\.4.*access denied", nodes[0].log())
    shutil.rmtree(directory, ignore_errors=True)
    assert not os.path.exists(directory / "nginx.pid")
