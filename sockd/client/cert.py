"""
C{sockd cert HOSTNAME [--out-dir DIR] [--days N]}: a self-signed certificate
and key for C{ssl:} endpoints.  For testing and private networks: clients
must be given the certificate itself as their trust root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import ipaddress
import os
import stat
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sockd.core.config import file_kind

__all__ = ["add_arguments", "make_certificate", "run", "write_pair"]

WARNING = (
    "sockd cert: this certificate is self-signed: use it for testing and "
    "private networks only; clients must trust {cert} explicitly."
)
MAX_DAYS = 3650


def _subject_name(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
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
    if not hostname or len(hostname) > 253 or any(c.isspace() for c in hostname):
        raise ValueError(f"{hostname!r} is not a host name or IP address")
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
        .add_extension(x509.SubjectAlternativeName([_subject_name(hostname)]), False)
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


def write_pair(directory: Path, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """Write C{cert.pem} (0644) and C{key.pem} (0600, never group- or
    world-readable, even for a moment) into C{directory}."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    _write_regular(key_path, key_pem, 0o600, follow=False)
    _write_regular(cert_path, cert_pem, 0o644, follow=True)
    return cert_path, key_path


def _write_regular(path: Path, data: bytes, mode: int, follow: bool) -> None:
    """
    Write C{data} to C{path}, a regular file or nothing yet: opening a FIFO
    there would block until someone read it.  C{mode} applies to a new
    file, and to an existing one if it is C{0o600}.
    """

    def check(info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise OSError(
                errno.EINVAL,
                f"{path} is {file_kind(info.st_mode)}, not a regular file",
            )

    with contextlib.suppress(FileNotFoundError):
        check(os.stat(path, follow_symlinks=follow))
    nofollow = 0 if follow else os.O_NOFOLLOW
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | nofollow
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as f:
        # Checked again on what was opened: the name may have changed since.
        check(os.fstat(fd))
        if mode == 0o600:
            os.fchmod(fd, mode)
        os.ftruncate(fd, 0)
        f.write(data)


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


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.days <= MAX_DAYS:
        print(f"sockd cert: --days must be from 1 to {MAX_DAYS}", file=sys.stderr)
        return 2
    try:
        cert_pem, key_pem = make_certificate(args.hostname, args.days)
    except ValueError as e:
        print(f"sockd cert: {e}", file=sys.stderr)
        return 2
    try:
        cert_path, key_path = write_pair(args.out_dir, cert_pem, key_pem)
    except OSError as e:
        print(f"sockd cert: {args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(WARNING.format(cert=cert_path), file=sys.stderr)
    print(
        f"wrote {cert_path} and {key_path}; listen with "
        f"ssl:PORT:privateKey={key_path}:certKey={cert_path}"
    )
    return 0
