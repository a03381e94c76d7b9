"""
Every sample configuration in etc/ starts every daemon it says it serves:
real twistd, on 127.0.0.1.  Addresses a sample binds are moved to port 0
with --set; sockets a sample expects from systemd are passed in, in the
order of the shipped .socket unit, by systemd-socket-activate.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import sockd.core.config as config
from tests.helpers import ROOT, Daemon, free_port_pair, socket_activation

pytestmark = pytest.mark.integration

SAMPLES = ROOT / "etc"


@dataclass(frozen=True)
class Claim:
    """A daemon a sample says it serves, and how systemd passes its sockets."""

    tapname: str
    #: the sockets of its .socket unit, in order: "stream" or "datagram"
    sockets: tuple[str, ...] = ()
    #: the sample's [file] root is a site path, replaced by a test directory
    site_root: bool = False


#: sample -> the daemons it claims: its header and the README say so
CLAIMS = {
    # The default (make run, and the packaged copy): every service.
    "sockd.ini": [
        Claim("sockd"),
        Claim("sockd-echo"),
        Claim("sockd-chat"),
        Claim("sockd-file"),
    ],
    # "one file serves all three", each under its own .socket unit.
    "sockd-socket-activated.ini": [
        Claim("sockd-echo", ("stream", "datagram")),
        Claim("sockd-chat", ("datagram",)),
        Claim("sockd-file", ("stream",), site_root=True),
    ],
}


def test_every_sample_is_claimed() -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.ini")) == sorted(CLAIMS)


@pytest.fixture
def files() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="sockd-sample-files-"))
    (directory / "hello.txt").write_text("hello from the sample root\n")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def runs(sample: Path, tapname: str) -> list[str]:
    """The sections C{tapname} runs with C{sample}."""
    if tapname != "sockd":
        return [tapname.removeprefix("sockd-")]
    loaded = config.load(str(sample))
    return [s for s in ("echo", "chat", "file") if getattr(loaded, s).enabled]


def on_port_zero(sample: Path, sections: list[str]) -> list[str]:
    """--set options moving each listen address of C{sections} to port 0."""
    loaded = config.load(str(sample), runs=sections)
    options = []
    for section in sections:
        settings = getattr(loaded, section)
        for key in ("listen", "listen_udp"):
            descriptions = getattr(settings, key, ())
            moved = [re.sub(r"^(tcp6?|udp|ssl):\d+", r"\1:0", d) for d in descriptions]
            assert all(":0" in d for d in moved), descriptions
            if moved:
                options.append(f"--set={section}.{key}={' '.join(moved)}")
    return options


def sample_daemon(
    sample: Path, claim: Claim, args: list[str], wrapper: list[str]
) -> Daemon:
    daemon = Daemon(claim.tapname, "", args, wrapper=wrapper)
    daemon.config_path = sample  # the sample itself, beside its sample files
    return daemon


@pytest.mark.parametrize(
    ("name", "claim"),
    [(name, claim) for name, claims in CLAIMS.items() for claim in claims],
    ids=lambda each: each.tapname if isinstance(each, Claim) else each,
)
def test_sample_starts_what_it_claims(name: str, claim: Claim, files: Path) -> None:
    sample = SAMPLES / name
    sections = runs(sample, claim.tapname)
    args = [f"--set=file.root={files}"] if claim.site_root else []
    if not claim.sockets:
        daemon = sample_daemon(sample, claim, args + on_port_zero(sample, sections), [])
        try:
            daemon.start()
            assert daemon.wait_for("sockd: ready").endswith(
                "sockd: ready: " + " ".join(sections)
            )
            for section in sections:
                served = [
                    a
                    for (s, _), got in daemon.ports.items()
                    if s == section
                    for a in got
                ]
                assert served, daemon.log()
                assert {host for host, _ in served} == {"127.0.0.1"}
        finally:
            daemon.stop()
        return
    port = free_port_pair()
    address = f"127.0.0.1:{port}"
    wrapper = socket_activation([(kind, address) for kind in claim.sockets], "sample")
    daemon = sample_daemon(sample, claim, args, wrapper)
    try:
        daemon.launch()
        # The first activator binds the first socket, and waits.
        daemon.wait_for(f"Listening on {address} as 3")
        activate(claim, daemon, port)
    finally:
        daemon.stop()


def activate(claim: Claim, daemon: Daemon, port: int) -> None:
    """The first connection or datagram starts the daemon; it is answered."""
    if claim.sockets[0] == "datagram":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(10)
            udp.sendto(b"hello\n", ("127.0.0.1", port))
            daemon.wait_for(daemon.READY, 20)
            # A newcomer is asked to prove it receives (validation).
            assert udp.recv(4096).startswith(b"*** @v="), daemon.log()
        return
    with socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
        if claim.tapname == "sockd-file":
            tcp.sendall(b"hello.txt\n")
            daemon.wait_for(daemon.READY, 20)
            assert tcp.recv(4096) == b"hello from the sample root\n", daemon.log()
            return
        # Port 7 as inetd's: bytes back as they come, unchanged, no newline
        # needed.
        tcp.sendall(b"no newline, Mixed Case")
        daemon.wait_for(daemon.READY, 20)
        echoed = b""
        while len(echoed) < 22:
            chunk = tcp.recv(100)
            assert chunk, daemon.log()
            echoed += chunk
        assert echoed == b"no newline, Mixed Case"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        udp.sendto(b"datagram, Mixed Case", ("127.0.0.1", port))
        assert udp.recv(100) == b"datagram, Mixed Case"
