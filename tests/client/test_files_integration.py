"""
C{sockd get|ls|stat|put} against a real C{twistd sockd-file} on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sockd.client.main import main
from tests.client.test_files import make_ca, server_pem
from tests.helpers import Daemon, running

pytestmark = pytest.mark.integration

BIG = os.urandom(5 * 1024 * 1024 + 123)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    root = tmp_path_factory.mktemp("root")
    (root / "big.bin").write_bytes(BIG)
    (root / "sub").mkdir()
    (root / "sub" / "a b%.txt").write_bytes(b"odd name\n")
    (root / "hello.txt").write_bytes(b"hello\n")
    ini = f"""
        [file]
        enabled = true
        listen = tcp:0:interface=127.0.0.1
        root = {root}
        writable = true
        """
    with running("sockd-file", ini) as daemon:
        yield daemon, root


def address(server: tuple[Daemon, Path]) -> str:
    return f"127.0.0.1:{server[0].port('file')}"


def sockd(capfd: Any, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = int(e.code or 0)
    out, err = capfd.readouterr()
    return status, out, err


def test_get_then_continue_a_truncated_part(
    server: tuple[Daemon, Path], tmp_path: Path, capfd: Any
) -> None:
    out = tmp_path / "big.bin"
    status, _, err = sockd(capfd, "get", address(server), "big.bin", "-o", str(out))
    assert (status, err) == (0, "")
    assert out.read_bytes() == BIG

    # An interrupted download leaves a prefix in OUT.part.
    out.unlink()
    part = tmp_path / "big.bin.part"
    part.write_bytes(BIG[: 3 * 1024 * 1024 + 7])
    status, _, err = sockd(
        capfd, "get", "--continue", address(server), "/big.bin", "-o", str(out)
    )
    assert (status, err) == (0, "")
    assert out.read_bytes() == BIG
    assert not part.exists()
    # Only the missing tail crossed the network.
    server[0].wait_for(rf"GET /big\.bin: {len(BIG) - (3 * 1024 * 1024 + 7)} bytes")


def test_ls_and_stat(server: tuple[Daemon, Path], capfd: Any) -> None:
    status, out, _ = sockd(capfd, "ls", address(server))
    assert status == 0
    assert {"big.bin", "hello.txt", "sub/"} <= set(out.splitlines())
    status, out, _ = sockd(capfd, "ls", "-l", address(server), "sub")
    assert status == 0
    assert out.startswith("f              9 ") and out.endswith(" a b%.txt\n")
    status, out, _ = sockd(capfd, "stat", "--sum", address(server), "sub/a b%.txt")
    assert status == 0
    assert "type:   file\nsize:   9\n" in out
    assert hashlib.sha256(b"odd name\n").hexdigest() in out


def test_errors_map_to_exit_statuses(
    server: tuple[Daemon, Path],
    tmp_path: Path,
    capfd: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for path, status in [("missing", 4), ("../etc/passwd", 5), ("sub", 7)]:
        got, _, err = sockd(capfd, "get", address(server), path)
        assert got == status, err
    assert os.listdir(tmp_path) == []


def test_put_round_trip_and_no_overwrite(
    server: tuple[Daemon, Path], tmp_path: Path, capfd: Any
) -> None:
    local = tmp_path / "up load.bin"
    local.write_bytes(BIG[:1_000_001])
    status, _, err = sockd(capfd, "put", address(server), str(local), "sub/")
    assert (status, err) == (0, "")
    assert (server[1] / "sub" / "up load.bin").read_bytes() == BIG[:1_000_001]
    # The server keeps existing files unless overwrite is on: ERR 409.
    status, _, err = sockd(capfd, "put", address(server), str(local), "sub/")
    assert status == 7
    assert "409" in err


def test_tls_against_the_daemon(tmp_path: Path, capfd: Any) -> None:
    ca = make_ca("sockd integration CA")
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    pem = server_pem(tmp_path / "server.pem", ca, [x509.DNSName("localhost")])
    root = tmp_path / "root"
    root.mkdir()
    (root / "t.txt").write_bytes(b"over TLS\n")
    ini = f"""
        [file]
        enabled = true
        listen = ssl:0:interface=127.0.0.1:privateKey={pem}
        root = {root}
        """
    with running("sockd-file", ini) as daemon:
        port = daemon.port("file")
        out = tmp_path / "t.txt"
        status, _, err = sockd(
            capfd,
            "get",
            "--cafile",
            str(cafile),
            f"localhost:{port}",
            "t.txt",
            "-o",
            str(out),
        )
        assert (status, err) == (0, "")
        assert out.read_bytes() == b"over TLS\n"
        # The certificate names localhost, not 127.0.0.1.
        status, _, err = sockd(
            capfd, "ls", "--cafile", str(cafile), f"127.0.0.1:{port}"
        )
        assert status == 6
        assert "certificate not accepted" in err


def test_console_script_exit_status(server: tuple[Daemon, Path]) -> None:
    # The real process, as a shell script sees it.
    result = subprocess.run(
        [sys.executable, "-m", "sockd.client.main", "stat", address(server), "nope"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 4
    assert result.stderr == b"sockd stat: server error 404: not found\n"
