"""
Who may upload, against real C{twistd sockd-file} daemons over real TLS on
loopback, with the certificates C{sockd cert} makes and the real C{sockd}
client: client certificates asked for (optional) or demanded (required),
and C{upload_allow} by source address (127.0.0.2 in, 127.0.0.3 out).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sockd.client.main import main
from tests.helpers import Daemon, running

pytestmark = pytest.mark.integration


def sockd(capfd: Any, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = int(e.code or 0)
    out, err = capfd.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server and two clients (alice, bob), and a stranger's CA."""
    top = tmp_path_factory.mktemp("pki")
    ca, other = str(top / "ca"), str(top / "other")
    commands = [
        ["--ca", ca],
        ["127.0.0.1", "--ca-dir", ca, "--out-dir", str(top / "server")],
        ["--client", "alice", "--ca-dir", ca, "--out-dir", str(top / "alice")],
        ["--client", "bob", "--ca-dir", ca, "--out-dir", str(top / "bob")],
        ["--ca", other],
        # alice's name, from a CA the server does not trust
        ["--client", "alice", "--ca-dir", other, "--out-dir", str(top / "mallory")],
    ]
    for argv in commands:
        assert main(["cert", *argv]) == 0, argv
    return top


def listeners(pki: Path) -> str:
    server = pki / "server"
    return (
        "tcp:0:interface=127.0.0.1 "
        f"ssl:0:interface=127.0.0.1:privateKey={server / 'key.pem'}"
        f":certKey={server / 'cert.pem'}"
    )


@pytest.fixture(scope="module")
def optional(
    pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Daemon, Path]]:
    root = tmp_path_factory.mktemp("optional")
    (root / "hello.txt").write_bytes(b"hello\n")
    ini = f"""
        [file]
        enabled = true
        listen = {listeners(pki)}
        root = {root}
        writable = true
        upload_clients = alice
        client_certs = optional
        client_ca = {pki / "ca" / "ca.pem"}
        """
    with running("sockd-file", ini) as daemon:
        yield daemon, root


@pytest.fixture(scope="module")
def required(
    pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Daemon, Path]]:
    root = tmp_path_factory.mktemp("required")
    (root / "hello.txt").write_bytes(b"hello\n")
    ini = f"""
        [file]
        enabled = true
        listen = {listeners(pki)}
        root = {root}
        writable = true
        upload_allow = 127.0.0.1 127.0.0.2
        client_certs = required
        client_ca = {pki / "ca" / "ca.pem"}
        """
    with running("sockd-file", ini) as daemon:
        yield daemon, root


def tls_url(daemon: Daemon, path: str) -> str:
    return f"sockd://127.0.0.1:{daemon.port('file', index=1)}/{path}"


def client(pki: Path, name: str | None) -> list[str]:
    """The TLS options of C{sockd get|put|ls} presenting C{name}'s certificate."""
    options = ["--cafile", str(pki / "ca" / "ca.pem"), "-q"]
    if name is not None:
        d = pki / name
        options += ["--cert", str(d / "cert.pem"), "--key", str(d / "key.pem")]
    return options


def test_optional_listed_certificate_uploads(
    optional: tuple[Daemon, Path], pki: Path, tmp_path: Path, capfd: Any
) -> None:
    daemon, root = optional
    local = tmp_path / "report.txt"
    local.write_bytes(b"quarterly\n")
    url = tls_url(daemon, "report.txt")
    status, _, err = sockd(capfd, "put", *client(pki, "alice"), url, str(local))
    assert (status, err) == (0, "")
    assert (root / "report.txt").read_bytes() == b"quarterly\n"


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        (None, "uploads need a client certificate"),
        ("bob", "client certificate bob may not upload"),
        ("mallory", "client certificate not accepted: it is not signed by the CA"),
    ],
)
def test_optional_others_refused_403_and_still_read(
    optional: tuple[Daemon, Path],
    pki: Path,
    tmp_path: Path,
    capfd: Any,
    who: str | None,
    reason: str,
) -> None:
    daemon, root = optional
    local = tmp_path / "x.txt"
    local.write_bytes(b"nope\n")
    url = tls_url(daemon, f"from-{who}.txt")
    status, _, err = sockd(capfd, "put", *client(pki, who), url, str(local))
    assert status == 5, err
    assert f"server error 403: {reason}" in err
    assert not (root / f"from-{who}.txt").exists()
    daemon.wait_for(rf"refused an upload from 127\.0\.0\.1 \(certificate\): {reason}")
    # Reads are unaffected, with or without a certificate.
    out = tmp_path / "hello.txt"
    status, _, err = sockd(
        capfd, "get", *client(pki, who), tls_url(daemon, "hello.txt"), "-o", str(out)
    )
    assert (status, err) == (0, "")
    assert out.read_bytes() == b"hello\n"


def test_required_refuses_handshake_without_a_valid_certificate(
    required: tuple[Daemon, Path], pki: Path, tmp_path: Path, capfd: Any
) -> None:
    daemon, _ = required
    url = tls_url(daemon, "hello.txt")
    for who in (None, "mallory"):
        out = tmp_path / f"{who}.txt"
        status, _, err = sockd(capfd, "get", *client(pki, who), url, "-o", str(out))
        assert status == 5, err
        assert "the server refused the TLS client certificate" in err
        assert not out.exists()
    out = tmp_path / "bob.txt"
    status, _, err = sockd(capfd, "get", *client(pki, "bob"), url, "-o", str(out))
    assert (status, err) == (0, "")
    assert out.read_bytes() == b"hello\n"


def put_from(source: str, port: int, name: str) -> bytes:
    """A raw C{PUT} of 3 bytes from the address C{source}: the answer line."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"PUT {name} 3\r\n".encode())
        answer = sock.makefile("rb").readline()
        if answer.startswith(b"OK"):
            sock.sendall(b"abc")
            sock.shutdown(socket.SHUT_WR)
            answer += sock.makefile("rb").readline()
        return answer


def test_upload_allow_by_source_address(required: tuple[Daemon, Path]) -> None:
    daemon, root = required
    port = daemon.port("file")
    answer = put_from("127.0.0.2", port, "two.bin")
    assert answer.startswith(b"OK ready\r\nOK stored 3 "), answer
    assert (root / "two.bin").read_bytes() == b"abc"
    answer = put_from("127.0.0.3", port, "three.bin")
    assert answer == b"ERR 403 unauthorised: uploads are not allowed from 127.0.0.3\r\n"
    assert not (root / "three.bin").exists()
    daemon.wait_for(r"refused an upload from 127\.0\.0\.3 \(acl\)")
