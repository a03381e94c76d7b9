"""
C{sockd cert HOSTNAME [--out-dir DIR] [--days N] [--force]}: a self-signed
certificate and key for C{ssl:} endpoints.  For testing and private
networks: clients must be given the certificate itself as their trust root.
An existing C{cert.pem} or C{key.pem} is replaced only with C{--force}.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sockd.client.exits import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from sockd.core.logs import escape

__all__ = [
    "add_arguments",
    "make_certificate",
    "run",
    "subject_name",
    "write_pair",
]

WARNING = (
    "sockd cert: this certificate is self-signed: use it for testing and "
    "private networks only; clients must trust {cert} explicitly."
)
MAX_DAYS = 3650


#: one DNS label (RFC 1123): letters, digits and inner hyphens, 1 to 63
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_ALLOWED = (
    "expected a DNS name (labels of 1-63 letters, digits or inner hyphens, "
    "at most 253 characters, optionally starting with a '*.' wildcard "
    "label; an internationalised name in its xn-- form) or an IPv4 or IPv6 "
    "address"
)


def subject_name(hostname: str) -> x509.GeneralName:
    """
    The C{subjectAltName} entry for C{hostname}: an IP address, or a DNS
    name (RFC 1123 labels; a leading C{*.} wildcard label is allowed over at
    least two more labels, as TLS clients only match those).  C{ValueError},
    naming the host escaped, for anything else.
    """
    # Escaped: the name may hold terminal controls (ESC, CR...).
    bad = f"'{escape(hostname)}' is not a host name or IP address"
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise ValueError(f"{bad}: a certificate cannot name a zone (%...)")
        return x509.IPAddress(address)
    labels = hostname.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
    if (
        not labels
        or len(hostname) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
    ):
        raise ValueError(f"{bad}: {_ALLOWED}")
    if labels[-1].isdigit():
        # 256.1.1.1 and friends: an address mistyped, not a name.
        raise ValueError(
            f"{bad}: not a valid IP address, and a DNS name "
            "cannot end in an all-numeric label"
        )
    if wildcard and len(labels) < 2:
        raise ValueError(
            f"{bad}: a wildcard needs at least two labels after '*.' "
            "(*.example.org), or no client will match it"
        )
    return x509.DNSName(hostname)


def make_certificate(
    hostname: str,
    days: int = 365,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """
    A self-signed certificate for C{hostname} (a DNS name or an IP address)
    valid from C{now} for C{days}, and its P-256 key: (cert PEM, key PEM).
    """
    subject = subject_name(hostname)
    start = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # A little slack for clocks that run behind.
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([subject]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def write_pair(
    directory: Path, cert_pem: bytes, key_pem: bytes, force: bool = False
) -> tuple[Path, Path]:
    """
    Write C{cert.pem} (0644) and C{key.pem} (0600, never group- or
    world-readable, even for a moment) into C{directory}.  Without
    C{force}, C{FileExistsError} if either exists (a symlink too) and
    nothing is written; with it, each is replaced whole by a rename, so a
    reader never sees a partial file and a symlink is replaced, not followed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    files = ((key_path, key_pem, 0o600), (cert_path, cert_pem, 0o644))
    if force:
        for path, data, mode in files:
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
            _create(temporary, data, mode)
            try:
                os.replace(temporary, path)
            except OSError:
                temporary.unlink(missing_ok=True)
                raise
        return cert_path, key_path
    for path, _, _ in files:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists: use --force to replace it")
    created: list[Path] = []
    try:
        for path, data, mode in files:
            _create(path, data, mode)
            created.append(path)
    except OSError:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return cert_path, key_path


def _create(path: Path, data: bytes, mode: int) -> None:
    """
    Write C{data} to C{path}, which must not exist yet (C{O_EXCL}: a file
    or symlink that appeared since a check is never written through).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode == 0o600:
                os.fchmod(f.fileno(), mode)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        path.unlink(missing_ok=True)
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hostname", help="DNS name or IP address clients will use")
    parser.add_argument(
        "--out-dir",
        default=".",
        type=Path,
        help="directory for cert.pem and key.pem (default: current)",
    )
    parser.add_argument(
        "--days", type=int, default=365, help=f"validity, 1 to {MAX_DAYS} days"
    )
    parser.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="replace cert.pem and key.pem if they exist",
    )


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.days <= MAX_DAYS:
        print(f"sockd cert: --days must be from 1 to {MAX_DAYS}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cert_pem, key_pem = make_certificate(args.hostname, args.days)
    except ValueError as e:
        print(f"sockd cert: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cert_path, key_path = write_pair(args.out_dir, cert_pem, key_pem, args.force)
    except FileExistsError as e:
        print(f"sockd cert: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        where = e.filename or args.out_dir
        print(f"sockd cert: {where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    print(WARNING.format(cert=cert_path), file=sys.stderr)
    print(
        f"wrote {cert_path} and {key_path}; listen with "
        f"ssl:PORT:privateKey={key_path}:certKey={cert_path}"
    )
    return EXIT_OK
