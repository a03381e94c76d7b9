"""
Who may upload (L{sockd.files.state.upload_refusal} and
L{FileState.authorise_upload}), in memory: address lists, certificate
names, both together, counting and logging refusals, and reloads.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.config import FileSettings, client_names, networks
from sockd.core.tls import ClientCertificate
from sockd.files.paths import PathError
from sockd.files.state import FileState, Peer, upload_refusal
from tests.helpers import settings, tempdir

ALICE = ClientCertificate(("alice", "alice.example.org"))


def file_settings(root: Path, **keys: str) -> FileSettings:
    return settings(
        file={"root": str(root), "enabled": "true", "writable": "true", **keys}
    ).file


class UploadRefusalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempdir(self)

    def refusal(self, peer: Peer, **keys: str) -> tuple[str, str] | None:
        # The rules alone: the config check (tests/core/test_config.py) wants
        # the ssl: listener and CA file that client certificates come with.
        rules = FileSettings(
            writable=True,
            upload_allow=networks(keys.get("upload_allow", ""), self.root),
            upload_clients=client_names(keys.get("upload_clients", ""), self.root),
        )
        return upload_refusal(rules, peer)

    def test_upload_allow_by_network_ipv4_ipv6_and_mapped(self) -> None:
        keys = {"upload_allow": "192.0.2.0/24 2001:db8::/32"}
        for host in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8::5"):
            self.assertIsNone(self.refusal(Peer(host), **keys), host)
        for host in ("192.0.3.1", "2001:db9::1", "unix"):
            self.assertEqual(
                self.refusal(Peer(host), **keys),
                ("acl", f"uploads are not allowed from {host}"),
            )

    def test_a_certificate_does_not_replace_the_address(self) -> None:
        self.assertEqual(
            self.refusal(Peer("10.0.0.1", ALICE), upload_allow="192.0.2.0/24"),
            ("acl", "uploads are not allowed from 10.0.0.1"),
        )

    def test_upload_clients_needs_a_verified_listed_certificate(self) -> None:
        keys = {
            "upload_clients": "Alice.Example.org carol",
        }
        # Names match ignoring case, by CN or SAN DNS name.
        self.assertIsNone(self.refusal(Peer("10.0.0.1", ALICE), **keys))
        self.assertEqual(
            self.refusal(Peer("10.0.0.1"), **keys),
            (
                "certificate",
                "uploads need a client certificate (sockd put --cert FILE --key FILE)",
            ),
        )
        stranger = ClientCertificate(("alice",), "it is not signed by the CA")
        self.assertEqual(
            self.refusal(Peer("10.0.0.1", stranger), **keys),
            (
                "certificate",
                "client certificate not accepted: it is not signed by the CA",
            ),
        )
        bob = ClientCertificate(("bob\r\nOK stored",))
        self.assertEqual(
            self.refusal(Peer("10.0.0.1", bob), **keys),
            ("certificate", "client certificate bob\\r\\nOK stored may not upload"),
        )
        self.assertEqual(
            self.refusal(Peer("10.0.0.1", ClientCertificate(())), **keys),
            ("certificate", "client certificate (no name) may not upload"),
        )

    def test_both_set_both_must_hold(self) -> None:
        keys = {
            "upload_allow": "10.0.0.0/8",
            "upload_clients": "alice",
        }
        self.assertIsNone(self.refusal(Peer("10.1.2.3", ALICE), **keys))
        self.assertEqual(self.refusal(Peer("192.0.2.1", ALICE), **keys)[0], "acl")
        self.assertEqual(self.refusal(Peer("10.1.2.3"), **keys)[0], "certificate")

    def test_peer_of_a_plain_transport_has_no_certificate(self) -> None:
        self.assertEqual(Peer.of("10.0.0.1", StringTransport()), Peer("10.0.0.1"))


class AuthoriseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempdir(self)
        self.state = FileState(
            file_settings(self.root, upload_allow="127.0.0.2"), Clock()
        )
        self.addCleanup(self.state.root.close)

    def test_refused_counted_and_logged_before_anything_is_created(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        error = self.assertRaises(
            PathError, self.state.begin_upload, b"x.bin", 3, Peer("127.0.0.3")
        )
        self.assertEqual(
            (error.code, error.reason), (403, "uploads are not allowed from 127.0.0.3")
        )
        self.assertEqual(self.state.upload_refused, {"acl": 1, "certificate": 0})
        self.assertEqual(list(self.root.iterdir()), [])
        logged = [e for e in events if "refused an upload" in e["log_format"]]
        self.assertEqual(len(logged), 1)
        self.assertEqual((logged[0]["peer"], logged[0]["reason"]), ("127.0.0.3", "acl"))

    def test_allowed_upload_begins(self) -> None:
        upload = self.state.begin_upload(b"x.bin", 3, Peer("127.0.0.2"))
        self.addCleanup(upload.abort)
        self.assertEqual(upload.name, "x.bin")

    def test_uploads_off_says_so_whoever_asks(self) -> None:
        self.state.reconfigure(
            file_settings(self.root, writable="false", upload_allow="127.0.0.2")
        )
        error = self.assertRaises(
            PathError, self.state.authorise_upload, Peer("127.0.0.2")
        )
        self.assertEqual(error.reason, "this server does not accept uploads")
        self.assertEqual(self.state.upload_refused, {"acl": 0, "certificate": 0})

    def test_reload_applies_new_list_to_the_next_upload(self) -> None:
        self.state.authorise_upload(Peer("127.0.0.2"))
        self.state.reconfigure(file_settings(self.root, upload_allow="127.0.0.3"))
        self.assertRaises(PathError, self.state.authorise_upload, Peer("127.0.0.2"))
        self.state.authorise_upload(Peer("127.0.0.3"))
