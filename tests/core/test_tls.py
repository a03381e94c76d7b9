"""
C{sockd cert}, and echo over C{ssl:} endpoints: a verifying client succeeds;
a wrong host name, an unknown CA or an expired certificate fail; a client
that never finishes the handshake is timed out.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import sockd.core.config as sockd_config
from sockd.client import cert
from sockd.client.main import main
from sockd.client.tls import client_context
from tests.helpers import run_bounded, running, unblock_fifo


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


class TestMakeCertificate:
    def test_dns_name(self) -> None:
        cert_pem, key_pem = cert.make_certificate("echo.example.org", days=10)
        certificate = load(cert_pem)
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        assert names.get_values_for_type(x509.DNSName) == ["echo.example.org"]
        assert certificate.issuer == certificate.subject
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        assert datetime.timedelta(days=10) < lifetime < datetime.timedelta(days=10.1)
        assert b"PRIVATE KEY" in key_pem
        assert b"ENCRYPTED" not in key_pem

    def test_ip_address(self) -> None:
        certificate = load(cert.make_certificate("127.0.0.1")[0])
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        assert names.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("127.0.0.1")
        ]
        assert names.get_values_for_type(x509.DNSName) == []

    def test_server_auth_and_not_a_ca(self) -> None:
        certificate = load(cert.make_certificate("localhost")[0])
        ext = certificate.extensions
        assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
        assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)

    def test_fresh_key_each_time(self) -> None:
        first = cert.make_certificate("localhost")
        second = cert.make_certificate("localhost")
        assert first[1] != second[1]

    def test_bad_hostnames(self) -> None:
        for bad in ("", "a b", "x" * 254):
            with pytest.raises(ValueError):
                cert.make_certificate(bad)

    def test_validity_starts_at_now(self) -> None:
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
        certificate = load(cert.make_certificate("localhost", days=1, now=past)[0])
        assert certificate.not_valid_after_utc == past + datetime.timedelta(days=1)


class TestCommand:
    def test_writes_pair_with_private_key_mode(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        status = main(["cert", "localhost", "--out-dir", str(tmp_path / "tls")])
        assert status == 0
        out, err = capsys.readouterr()
        assert "self-signed" in err and "testing" in err
        key = tmp_path / "tls" / "key.pem"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        assert f"privateKey={key}" in out
        load((tmp_path / "tls" / "cert.pem").read_bytes())

    def test_config_accepts_the_pair_by_relative_path(self, tmp_path: Path) -> None:
        assert main(["cert", "localhost", "--out-dir", str(tmp_path)]) == 0
        parsed = sockd_config.parse(
            "[echo]\nlisten = ssl:0:privateKey=key.pem:certKey=cert.pem\n",
            "<test>",
            tmp_path,
        )
        assert f"privateKey={tmp_path / 'key.pem'}" in parsed.echo.listen[0]

    def test_days_out_of_range(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert (
            main(["cert", "localhost", "--out-dir", str(tmp_path), "--days", "0"]) == 2
        )
        assert "--days" in capsys.readouterr().err
        assert not (tmp_path / "key.pem").exists()

    def test_bad_hostname(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["cert", "bad host"]) == 2
        assert "not a host name" in capsys.readouterr().err

    def test_key_written_through_symlink_is_refused(self, tmp_path: Path) -> None:
        target = tmp_path / "elsewhere"
        target.write_text("keep")
        (tmp_path / "key.pem").symlink_to(target)
        assert main(["cert", "localhost", "--out-dir", str(tmp_path)]) == 1
        assert target.read_text() == "keep"

    def test_fifos_in_place_of_the_pair_are_refused_at_once(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # No reader: opening them for writing would block forever.
        for name in ("key.pem", "cert.pem"):
            directory = tmp_path / name.split(".")[0]
            directory.mkdir()
            fifo = directory / name
            os.mkfifo(fifo)
            status = run_bounded(
                lambda d=directory: main(["cert", "localhost", "--out-dir", str(d)]),
                release=unblock_fifo(fifo),
            )
            assert status == 1
            assert f"{fifo} is a FIFO (named pipe), not a regular file" in (
                capsys.readouterr().err
            )
            assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_cafile_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="it is a FIFO"):
        run_bounded(lambda: client_context(str(fifo)), release=unblock_fifo(fifo))


# --- a real twistd over TLS -------------------------------------------------


def write(directory: Path, name: str, pair: tuple[bytes, bytes]) -> None:
    (directory / f"{name}-cert.pem").write_bytes(pair[0])
    (directory / f"{name}-key.pem").write_bytes(pair[1])


def client(port: int, hostname: str, cafile: Path, strict: bool = False) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    if strict:
        # The default from Python 3.13 on.
        context.verify_flags |= ssl.VERIFY_X509_STRICT
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        tls.sendall(b"hello tls\n")
        return tls.recv(100)


def seconds_until_closed(sock: socket.socket) -> float:
    """Wait (up to the socket timeout) for the server to close or reset."""
    started = time.monotonic()
    # Aborted after the grace period (a reset) is closed all the same.
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(100) == b""
    return time.monotonic() - started


@pytest.mark.integration
def test_echo_over_tls(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    write(tmp_path, "good", cert.make_certificate("localhost"))
    write(
        tmp_path,
        "old",
        cert.make_certificate("localhost", 1, now - datetime.timedelta(days=30)),
    )
    write(tmp_path, "stranger", cert.make_certificate("localhost"))
    ini = """
        [sockd]
        abort_grace = 0.5
        [echo]
        listen =
            ssl:0:interface=127.0.0.1:privateKey=good-key.pem:certKey=good-cert.pem
            ssl:0:interface=127.0.0.1:privateKey=old-key.pem:certKey=old-cert.pem
        listen_udp =
        idle_timeout = 1
        """
    with running("sockd-echo", ini, directory=tmp_path) as daemon:
        good = daemon.port("echo", "TCP", 0)
        old = daemon.port("echo", "TCP", 1)

        assert client(good, "localhost", tmp_path / "good-cert.pem") == b"HELLO TLS\n"
        assert (
            client(good, "localhost", tmp_path / "good-cert.pem", strict=True)
            == b"HELLO TLS\n"
        )
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            client(good, "echo.example.org", tmp_path / "good-cert.pem")
        with pytest.raises(ssl.SSLCertVerificationError, match=r"self.signed|issuer"):
            client(good, "localhost", tmp_path / "stranger-cert.pem")
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            client(old, "localhost", tmp_path / "old-cert.pem")

        # A client that connects and never starts the handshake is closed by
        # the idle timeout (1 s) plus the abort grace (0.5 s).
        with socket.create_connection(("127.0.0.1", good), timeout=4) as raw:
            assert seconds_until_closed(raw) < 2.5
        # One that stops half way through its ClientHello, too.
        with socket.create_connection(("127.0.0.1", good), timeout=4) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            assert seconds_until_closed(raw) < 2.5
        daemon.wait_for("echo: closing .*: idle timeout")

        # Still serving after all that.
        assert client(good, "localhost", tmp_path / "good-cert.pem") == b"HELLO TLS\n"
