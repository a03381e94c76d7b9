"""
C{sockd echo} (sockd.client.echo) against a real C{twistd sockd-echo},
over TCP and over TLS with a pair from C{sockd cert}.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockd.client.main import main
from sockd.client.tls import TLSStream, client_context
from tests.helpers import Daemon, run_tool, running

pytestmark = pytest.mark.integration

ECHO = [sys.executable, "-m", "sockd.client.main", "echo"]


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("tls")
    assert main(["cert", "localhost", "--out-dir", str(directory)]) == 0
    ini = """
        [echo]
        listen =
            ssl:0:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem
            tcp:0:interface=127.0.0.1
        listen_udp =
        """
    with running("sockd-echo", ini, directory=directory) as daemon:
        yield daemon


def test_echo_over_tls_with_cacert(tls_daemon: Daemon) -> None:
    port = tls_daemon.port("echo", "TCP", 0)
    cacert = str(tls_daemon.directory / "cert.pem")
    # The end of the input goes as close_notify, after the answers: run
    # many times, as a lost answer only shows now and then.
    for _ in range(10):
        result = run_tool(
            [*ECHO, "--cacert", cacert, f"localhost:{port}", "hello", "world"]
        )
        assert (result.returncode, result.stdout) == (0, b"HELLO\nWORLD\n"), (
            result.stderr
        )
    piped = run_tool(
        [*ECHO, "--tls", "--cafile", cacert, f"localhost:{port}"],
        "ça va\nsecond\n".encode(),
    )
    assert piped.stdout == "ÇA VA\nSECOND\n".encode(), piped.stderr


def test_certificate_not_accepted(tls_daemon: Daemon) -> None:
    port = tls_daemon.port("echo", "TCP", 0)
    cacert = str(tls_daemon.directory / "cert.pem")
    # The system CAs do not know a self-signed pair; 127.0.0.1 is not its name.
    for argv in (
        ["--tls", f"localhost:{port}", "hi"],
        ["--cacert", cacert, f"127.0.0.1:{port}", "hi"],
    ):
        result = run_tool([*ECHO, *argv])
        assert result.returncode == 6, result.stderr
        assert b"TLS certificate not accepted" in result.stderr
        assert result.stdout == b""


def test_tls_to_a_plain_port_fails_as_a_connection(tls_daemon: Daemon) -> None:
    plain = tls_daemon.port("echo", "TCP", 1)
    cacert = str(tls_daemon.directory / "cert.pem")
    # The echo server answers a ClientHello with its bytes, or waits for
    # its newline: either way no handshake, and the client gives up.
    argv = ["--timeout", "2", "--cacert", cacert, f"localhost:{plain}", "hi"]
    result = run_tool([*ECHO, *argv])
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(f"sockd echo: localhost:{plain}: ".encode())


def test_unreadable_cacert_is_a_usage_error(tmp_path: Path) -> None:
    result = run_tool([*ECHO, "--cacert", str(tmp_path / "none.pem"), "x:1", "hi"])
    assert result.returncode == 2
    assert b"cannot load CA certificates" in result.stderr


def test_help_lists_tls_options_and_exit_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["echo", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--tls" in out and "--cafile PATH, --cacert PATH" in out
    assert "6    the server's TLS certificate" in out


def test_tls_stream_half_closes(tmp_path: Path) -> None:
    """Reading goes on after close_notify, until the server's."""
    assert main(["cert", "localhost", "--out-dir", str(tmp_path)]) == 0
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while chunk := tls.recv(100):  # b"" at the client's close_notify
                data += chunk
            seen.append(data)
            tls.sendall(data.upper())  # answered only after the input ended
            tls.unwrap()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            stream = TLSStream(
                raw, client_context(str(tmp_path / "cert.pem")), "localhost"
            )
            stream.handshake()
            stream.sendall(b"end of input\n")
            stream.close_write()
            answer = b""
            while chunk := stream.recv():
                answer += chunk
        thread.join(5)
    finally:
        listener.close()
    assert seen == [b"end of input\n"]
    assert answer == b"END OF INPUT\n"
