"""
Client certificates on C{ssl:} listeners: asking for them
(L{ask_client_certificates}) and saying what a connection's certificate
names and whether it verified (L{client_certificate}).

C{required}: the handshake fails without a certificate that verifies
against the CA file.  C{optional}: a client may send none, or one that
does not verify; the connection goes on, and L{client_certificate} says
why the certificate is not to be trusted (as nginx's C{ssl_verify_client
optional_no_ca} does).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import ISSLTransport

__all__ = [
    "ClientCertificate",
    "ask_client_certificates",
    "client_certificate",
    "names_of",
]

#: a few of OpenSSL's X509_V_ERR_* codes, for messages (others by number)
_VERIFY_ERRORS = {
    2: "its issuer's certificate is not known",
    7: "its signature is invalid",
    9: "it is not valid yet",
    10: "it has expired",
    18: "it is self-signed and not the CA",
    19: "its chain ends in a self-signed certificate that is not the CA",
    20: "it is not signed by the CA (client_ca)",
    21: "it is not signed by the CA (client_ca)",
    24: "a certificate in its chain is not a CA",
    26: "it is not meant for TLS clients (extended key usage)",
}

#: connection -> why its client certificate did not verify (optional mode)
_failures: weakref.WeakKeyDictionary[SSL.Connection, str] = weakref.WeakKeyDictionary()


def _record(
    connection: SSL.Connection, cert: Any, error: int, depth: int, ok: int
) -> bool:
    """Optional mode: note the first failure, and let the handshake go on."""
    if not ok and connection not in _failures:
        why = _VERIFY_ERRORS.get(error, f"OpenSSL verify error {error}")
        where = "" if depth == 0 else f" (certificate {depth} of its chain)"
        _failures[connection] = f"{why}{where}"
    return True


def _enforce(
    connection: SSL.Connection, cert: Any, error: int, depth: int, ok: int
) -> bool:
    """Required mode: OpenSSL's verdict stands."""
    return bool(ok)


def ask_client_certificates(options: Any, mode: str, cafile: Path) -> None:
    """
    Make the TLS context of C{options} (Twisted's C{CertificateOptions}, as
    an C{ssl:} endpoint makes it) ask clients for a certificate signed by a
    CA of C{cafile}: C{mode} C{required} or C{optional}.  OpenSSL errors
    (C{SSL.Error}) if C{cafile} cannot be loaded.
    """
    context: SSL.Context = options.getContext()
    # A resumed session skips verification, and with it L{_record}: none
    # (Twisted's default already, kept whatever its defaults become).
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_options(SSL.OP_NO_TICKET)
    # Trusted for verifying, and named to clients so they pick a certificate.
    context.load_verify_locations(str(cafile).encode())
    context.load_client_ca(str(cafile).encode())
    if mode == "required":
        flags = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(flags | SSL.VERIFY_CLIENT_ONCE, _enforce)
    elif mode == "optional":
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _record)
    else:
        raise ValueError(f"client certificates: unknown mode {mode!r}")


@dataclass(frozen=True)
class ClientCertificate:
    """What a connection's client certificate says, and whether to believe it."""

    #: its subject CNs and subjectAltName DNS names, lower case
    names: tuple[str, ...]
    #: why it did not verify against the CA; empty if it did
    problem: str = ""


def client_certificate(transport: object) -> ClientCertificate | None:
    """
    The client certificate of a TLS connection (None: not TLS, or no
    certificate sent) after its handshake.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    peer: Any = transport.getPeerCertificate()
    if peer is None:
        return None
    handle = getattr(transport, "getHandle", lambda: None)()
    problem = _failures.get(handle, "") if handle is not None else ""
    return ClientCertificate(names_of(peer.to_cryptography()), problem)


def names_of(certificate: x509.Certificate) -> tuple[str, ...]:
    """A certificate's subject CNs, then its subjectAltName DNS names, lower case."""
    names = [
        value.lower()
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if isinstance(value := attribute.value, str)
    ]
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        pass
    else:
        names.extend(name.lower() for name in san.get_values_for_type(x509.DNSName))
    return tuple(dict.fromkeys(names))
