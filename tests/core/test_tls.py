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
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import ssl as twisted_ssl
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransportWithDisconnection,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

import sockd.core.config as sockd_config
import sockd.echo.tap as echo_tap
from sockd.client import cert
from sockd.client.main import main
from sockd.client.tls import client_context
from sockd.core.limits import GuardedFactory, GuardedProtocol
from sockd.core.tls import (
    ClientCertificate,
    ask_client_certificates,
    client_certificate,
    names_of,
)
from tests.helpers import connect, run_bounded, running, unblock_fifo


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


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
        for bad in (
            "",
            "a b",
            "x" * 254,
            "evil\x1b[31m",  # a SAN that colours the terminal of whoever reads it
            "a\r\nb",
            "host\x00name",
            "a..b",
            "example.org.",
            "-a.example.org",
            "a-.example.org",
            "under_score.example.org",
            "a." + "b" * 64 + ".org",
            ".".join(["a" * 63] * 4),  # 255 characters
            "\u00e9t\u00e9.example.org",
            "256.1.1.1",
            "1.2.3.4.5",
            "*",
            "*.org",
            "a.*.example.org",
            "**.example.org",
            "fe80::1%eth0",
        ):
            with pytest.raises(ValueError, match="not a host name or IP address"):
                cert.make_certificate(bad)

    def test_good_hostnames(self) -> None:
        longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253
        for good in ("localhost", "a-b.example.org", "9echo.example.org", longest):
            assert cert.subject_name(good) == x509.DNSName(good)
        assert cert.subject_name("xn--e1afmkfd.org") == x509.DNSName("xn--e1afmkfd.org")

    def test_wildcard(self) -> None:
        certificate = load(cert.make_certificate("*.echo.example.org")[0])
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        assert names.get_values_for_type(x509.DNSName) == ["*.echo.example.org"]

    def test_ipv6_address(self) -> None:
        certificate = load(cert.make_certificate("2001:db8::1")[0])
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        assert names.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("2001:db8::1")
        ]
        assert names.get_values_for_type(x509.DNSName) == []

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

    def test_control_characters_refused_and_shown_escaped(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        status = main(["cert", "evil\x1b[31m", "--out-dir", str(tmp_path)])
        assert status == 2
        err = capsys.readouterr().err
        assert "\x1b" not in err
        assert "'evil\\x1b[31m' is not a host name or IP address" in err
        assert "expected a DNS name" in err
        assert list(tmp_path.iterdir()) == []

    def test_existing_pair_kept_without_force(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["cert", "localhost", "--out-dir", str(tmp_path)]) == 0
        key, pem = (
            (tmp_path / "key.pem").read_bytes(),
            (tmp_path / "cert.pem").read_bytes(),
        )
        capsys.readouterr()
        assert main(["cert", "other.example.org", "--out-dir", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert f"{tmp_path / 'key.pem'} exists: use --force to replace it" in err
        assert (tmp_path / "key.pem").read_bytes() == key
        assert (tmp_path / "cert.pem").read_bytes() == pem

    def test_an_existing_certificate_alone_is_kept(self, tmp_path: Path) -> None:
        (tmp_path / "cert.pem").write_text("mine")
        assert main(["cert", "localhost", "--out-dir", str(tmp_path)]) == 1
        assert (tmp_path / "cert.pem").read_text() == "mine"
        assert not (tmp_path / "key.pem").exists()

    def test_force_replaces(self, tmp_path: Path) -> None:
        assert main(["cert", "localhost", "--out-dir", str(tmp_path)]) == 0
        old_key = (tmp_path / "key.pem").read_bytes()
        args = ["cert", "echo.example.org", "--out-dir", str(tmp_path), "--force"]
        assert main(args) == 0
        assert (tmp_path / "key.pem").read_bytes() != old_key
        assert stat.S_IMODE(os.stat(tmp_path / "key.pem").st_mode) == 0o600
        names = (
            load((tmp_path / "cert.pem").read_bytes())
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
        assert names.get_values_for_type(x509.DNSName) == ["echo.example.org"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem"]

    def test_force_replaces_a_symlink_not_its_target(self, tmp_path: Path) -> None:
        target = tmp_path / "elsewhere"
        target.write_text("keep")
        (tmp_path / "key.pem").symlink_to(target)
        args = ["cert", "localhost", "--out-dir", str(tmp_path), "-f"]
        assert main(args) == 0
        assert target.read_text() == "keep"
        assert not (tmp_path / "key.pem").is_symlink()
        assert b"PRIVATE KEY" in (tmp_path / "key.pem").read_bytes()

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
            assert f"{fifo} exists: use --force to replace it" in (
                capsys.readouterr().err
            )
            assert stat.S_ISFIFO(os.stat(fifo).st_mode)
            # --force renames a new file over it, never opening it.
            status = run_bounded(
                lambda d=directory: main(
                    ["cert", "localhost", "--out-dir", str(d), "-f"]
                ),
                release=unblock_fifo(fifo),
            )
            assert status == 0
            assert stat.S_ISREG(os.stat(fifo).st_mode)


def test_cafile_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="it is a FIFO"):
        run_bounded(lambda: client_context(str(fifo)), release=unblock_fifo(fifo))


# --- the handshake deadline, in memory --------------------------------------


class Recorder(Protocol):
    """A server-side protocol under the limits that keeps what it gets."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Guarded(GuardedProtocol):
    def dataReceived(self, data: bytes) -> None:
        self.touch()
        self.transport.write(data.upper())  # type: ignore[union-attr]


class TestHandshakeDeadline:
    def setup_method(self) -> None:
        cert_pem, key_pem = cert.make_certificate("localhost")
        self.server_options = twisted_ssl.PrivateCertificate.loadPEM(
            (key_pem + cert_pem).decode()
        ).options()
        self.client_options = twisted_ssl.optionsForClientTLS(
            "localhost", twisted_ssl.Certificate.loadPEM(cert_pem.decode())
        )
        self.clock = Clock()
        self.factory = GuardedFactory(
            self.clock,
            SimpleNamespace(
                max_connections=10, max_connections_per_ip=10, idle_timeout=300
            ),
            request_timeout=60,
            abort_grace=5,
        )
        self.factory.protocol = Guarded
        self.factory.handshake_timeout = 3
        self.tls = TLSMemoryBIOFactory(
            self.server_options, False, self.factory, self.clock
        )

    def test_silent_client_aborted_at_the_deadline(self) -> None:
        server = self.tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransportWithDisconnection()
        transport.protocol = server
        server.makeConnection(transport)
        self.clock.advance(2.9)
        assert transport.connected
        self.clock.advance(0.1)
        assert not transport.connected
        assert self.factory.timeouts == {"idle": 0, "request": 0, "handshake": 1}
        assert self.factory.limiter.total == 0
        assert self.clock.getDelayedCalls() == []

    def test_half_a_client_hello_too(self) -> None:
        server = self.tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransportWithDisconnection()
        transport.protocol = server
        server.makeConnection(transport)
        server.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.clock.advance(3)
        assert not transport.connected
        assert self.factory.timeouts == {"idle": 0, "request": 0, "handshake": 1}

    def test_completed_handshake_lifts_the_deadline(self) -> None:
        client_tls = TLSMemoryBIOFactory(
            self.client_options, True, ClientFactory.forProtocol(Recorder), self.clock
        )
        addr = IPv4Address("TCP", "127.0.0.1", 40000)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: self.tls.buildProtocol(addr),
            lambda: client_tls.buildProtocol(addr),
            clock=self.clock,
        )
        pump.flush()
        self.clock.advance(10)  # well past the handshake deadline
        client.write(b"hello")
        pump.flush()
        assert client.wrappedProtocol.received == b"HELLO"
        assert not server.transport.disconnecting
        assert self.factory.timeouts == {"idle": 0, "request": 0, "handshake": 0}

    def test_timeout_key_checked(self) -> None:
        assert sockd_config.parse("").sockd.tls_handshake_timeout == 10
        bad = "[sockd]\ntls_handshake_timeout = 0\n"
        with pytest.raises(sockd_config.ConfigError, match=r"seconds from 0\.1"):
            sockd_config.parse(bad)

    def test_plain_tcp_has_no_handshake_deadline(self) -> None:
        _, transport = connect(self.factory)
        self.clock.advance(10)
        assert transport.connected
        assert self.factory.timeouts == {"idle": 0, "request": 0, "handshake": 0}

    def test_service_wiring_sets_the_configured_timeout(self, tmp_path: Path) -> None:
        ini = tmp_path / "sockd.ini"
        ini.write_text(
            "[sockd]\ntls_handshake_timeout = 2.5\n"
            "[echo]\nlisten = tcp:0:interface=127.0.0.1\nlisten_udp =\n"
        )
        options = echo_tap.Options()
        options.parseOptions(["--config", str(ini)])
        service = echo_tap.makeService(options, reactor=MemoryReactorClock())
        service.startService()
        try:
            (factory,) = [
                child.target
                for child in service
                if isinstance(getattr(child, "target", None), GuardedFactory)
            ]
            assert factory.handshake_timeout == 2.5
        finally:
            service.stopService()


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
        tls_handshake_timeout = 1
        [echo]
        listen =
            ssl:0:interface=127.0.0.1:privateKey=good-key.pem:certKey=good-cert.pem
            ssl:0:interface=127.0.0.1:privateKey=old-key.pem:certKey=old-cert.pem
        listen_udp =
        idle_timeout = 60
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

        # A client that connects and never starts the handshake is cut off
        # by the handshake timeout (1 s), long before the idle timeout (60 s).
        with socket.create_connection(("127.0.0.1", good), timeout=10) as raw:
            assert 0.5 < seconds_until_closed(raw) < 5
        # One that stops half way through its ClientHello, too.
        with socket.create_connection(("127.0.0.1", good), timeout=10) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            assert 0.5 < seconds_until_closed(raw) < 5
        daemon.wait_for("echo: closing .*: handshake timeout")

        # Still serving after all that.
        assert client(good, "localhost", tmp_path / "good-cert.pem") == b"HELLO TLS\n"


class TestClientCertificates:
    """
    C{ask_client_certificates} and C{client_certificate}, in memory: a CA,
    certificates it signs (C{sockd cert}'s own), and a stranger's.
    """

    def setup_method(self) -> None:
        self.ca = cert.make_ca()
        ca_key, ca_cert = (
            load_key(self.ca[1]),
            load(self.ca[0]),
        )
        self.issuer = (ca_key, ca_cert)
        server_pem = cert.make_certificate("localhost", issuer=self.issuer)
        self.server_pem = server_pem
        self.clock = Clock()

    def connect(
        self, mode: str, cafile: Path, client_pair: tuple[bytes, bytes] | None
    ) -> tuple[Any, Any, Any]:
        """Handshake in memory; the server-side and client-side protocols."""
        cert_pem, key_pem = self.server_pem
        server_options = twisted_ssl.PrivateCertificate.loadPEM(
            (key_pem + cert_pem).decode()
        ).options()
        ask_client_certificates(server_options, mode, cafile)
        extra = {}
        if client_pair is not None:
            extra["clientCertificate"] = twisted_ssl.PrivateCertificate.loadPEM(
                (client_pair[1] + client_pair[0]).decode()
            )
        client_options = twisted_ssl.optionsForClientTLS(
            "localhost", twisted_ssl.Certificate.loadPEM(self.ca[0].decode()), **extra
        )
        server_tls = TLSMemoryBIOFactory(
            server_options, False, ClientFactory.forProtocol(Recorder), self.clock
        )
        client_tls = TLSMemoryBIOFactory(
            client_options, True, ClientFactory.forProtocol(Recorder), self.clock
        )
        addr = IPv4Address("TCP", "127.0.0.1", 40000)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: server_tls.buildProtocol(addr),
            lambda: client_tls.buildProtocol(addr),
            clock=self.clock,
        )
        client.write(b"hello")
        pump.flush()
        return server, client, pump

    def write_ca(self, tmp_path: Path) -> Path:
        path = tmp_path / "ca.pem"
        path.write_bytes(self.ca[0])
        return path

    def test_optional_verified_names(self, tmp_path: Path) -> None:
        alice = cert.make_certificate(
            "alice.example.org", issuer=self.issuer, client=True
        )
        server, _, _ = self.connect("optional", self.write_ca(tmp_path), alice)
        assert server.wrappedProtocol.received == b"hello"
        assert client_certificate(server) == ClientCertificate(("alice.example.org",))

    def test_optional_stranger_and_none_connect_but_are_not_trusted(
        self, tmp_path: Path
    ) -> None:
        ca = self.write_ca(tmp_path)
        other = cert.make_ca()
        stranger = cert.make_certificate(
            "alice",
            issuer=(load_key(other[1]), load(other[0])),
            client=True,
        )
        server, _, _ = self.connect("optional", ca, stranger)
        assert server.wrappedProtocol.received == b"hello"
        assert client_certificate(server) == ClientCertificate(
            ("alice",), "it is not signed by the CA (client_ca)"
        )
        self_signed = cert.make_certificate("alice", client=True)
        server, _, _ = self.connect("optional", ca, self_signed)
        found = client_certificate(server)
        assert found is not None and found.problem
        server, _, _ = self.connect("optional", ca, None)
        assert server.wrappedProtocol.received == b"hello"
        assert client_certificate(server) is None

    def test_required_refuses_the_handshake(self, tmp_path: Path) -> None:
        ca = self.write_ca(tmp_path)
        server, _, _ = self.connect("required", ca, None)
        assert getattr(server.wrappedProtocol, "received", b"") == b""
        assert server.transport.disconnecting or not server.transport.connected
        other = cert.make_ca()
        stranger = cert.make_certificate(
            "bob", issuer=(load_key(other[1]), load(other[0])), client=True
        )
        server, _, _ = self.connect("required", ca, stranger)
        assert getattr(server.wrappedProtocol, "received", b"") == b""
        assert server.transport.disconnecting or not server.transport.connected
        bob = cert.make_certificate("bob", issuer=self.issuer, client=True)
        server, _, _ = self.connect("required", ca, bob)
        assert server.wrappedProtocol.received == b"hello"
        assert client_certificate(server) == ClientCertificate(("bob",))

    def test_plain_transport_has_none(self) -> None:
        assert client_certificate(StringTransportWithDisconnection()) is None


class TestPrivateCA:
    def test_ca_then_client_then_server(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        ca = tmp_path / "ca"
        assert main(["cert", "--ca", str(ca)]) == 0
        assert stat.S_IMODE(os.stat(ca / "ca-key.pem").st_mode) == 0o600
        authority = load((ca / "ca.pem").read_bytes())
        constraints = authority.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
        assert constraints.ca and constraints.path_length == 0
        assert main(
            ["cert", "--client", "alice.example.org", "--ca-dir", str(ca),
             "--out-dir", str(tmp_path / "alice")]
        ) == 0  # fmt: skip
        assert main(["cert", "--client", "bob_1", "--ca-dir", str(ca),
                     "--out-dir", str(tmp_path / "bob")]) == 0  # fmt: skip
        assert main(["cert", "localhost", "--ca-dir", str(ca),
                     "--out-dir", str(tmp_path / "server")]) == 0  # fmt: skip
        out, err = capsys.readouterr()
        assert "self-signed" not in err
        assert "sockd put --cert" in out
        alice = load((tmp_path / "alice" / "cert.pem").read_bytes())
        assert alice.issuer == authority.subject
        assert names_of(alice) == ("alice.example.org",)
        usage = alice.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert list(usage.value) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
        alice.verify_directly_issued_by(authority)
        # Not a DNS name: the CN alone.
        bob = load((tmp_path / "bob" / "cert.pem").read_bytes())
        assert names_of(bob) == ("bob_1",)
        with pytest.raises(x509.ExtensionNotFound):
            bob.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        server = load((tmp_path / "server" / "cert.pem").read_bytes())
        server.verify_directly_issued_by(authority)
        # The server's certificate and the CA are what a client trusts.
        ssl.create_default_context(cafile=str(ca / "ca.pem")).load_cert_chain(
            tmp_path / "alice" / "cert.pem", tmp_path / "alice" / "key.pem"
        )

    def test_existing_ca_kept_without_force(self, tmp_path: Path) -> None:
        ca = tmp_path / "ca"
        assert main(["cert", "--ca", str(ca)]) == 0
        before = (ca / "ca.pem").read_bytes()
        assert main(["cert", "--ca", str(ca)]) == 1
        assert (ca / "ca.pem").read_bytes() == before
        assert main(["cert", "--ca", str(ca), "--force"]) == 0
        assert (ca / "ca.pem").read_bytes() != before

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--client", "alice"], "--client NAME needs --ca-dir DIR"),
            (["localhost", "--ca", "x"], "give exactly one of"),
            ([], "give exactly one of"),
            (["--ca", "x", "--out-dir", "y"], "no --ca-dir or --out-dir"),
            (["--client", "a b", "--ca-dir", "."], "expected one name"),
            (["--client", "x\x1b", "--ca-dir", "."], "is not a certificate name"),
        ],
    )
    def test_usage_errors(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        argv: list[str],
        message: str,
    ) -> None:
        assert main(["cert", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err
        assert "\x1b" not in err

    def test_missing_or_wrong_ca_dir(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        argv = ["cert", "--client", "alice", "--out-dir", str(tmp_path / "out")]
        assert main([*argv, "--ca-dir", str(tmp_path)]) == 1
        assert "make a CA first: sockd cert --ca" in capsys.readouterr().err
        assert main(["cert", "localhost", "--out-dir", str(tmp_path)]) == 0
        (tmp_path / "cert.pem").rename(tmp_path / "ca.pem")
        (tmp_path / "key.pem").rename(tmp_path / "ca-key.pem")
        assert main([*argv, "--ca-dir", str(tmp_path)]) == 1
        assert "is not a CA certificate" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


class TestClientContextCertificate:
    def test_mismatched_and_unreadable_files(self, tmp_path: Path) -> None:
        one = cert.make_certificate("alice", client=True)
        two = cert.make_certificate("bob", client=True)
        (tmp_path / "one.pem").write_bytes(one[0])
        (tmp_path / "two-key.pem").write_bytes(two[1])
        with pytest.raises(ValueError, match="the key is not the certificate's"):
            client_context(
                None, str(tmp_path / "one.pem"), str(tmp_path / "two-key.pem")
            )
        with pytest.raises(ValueError, match="No such file"):
            client_context(None, str(tmp_path / "none.pem"))
        with pytest.raises(ValueError, match="cannot load a PEM certificate"):
            client_context(None, str(tmp_path / "one.pem"))  # no key in it
        with pytest.raises(ValueError, match="give --cert too"):
            client_context(None, None, str(tmp_path / "two-key.pem"))

    def test_put_usage_error_exit_status(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        fifo = tmp_path / "cert.fifo"
        os.mkfifo(fifo)
        local = tmp_path / "local.txt"
        local.write_bytes(b"x")
        status = main(["put", "127.0.0.1:1", str(local), "x", "--cert", str(fifo)])
        assert status == 2
        err = capsys.readouterr().err
        assert "cannot load the client certificate: it is a FIFO" in err
