"""
C{sockd cert HOSTNAME [--out-dir DIR] [--days N] [--force]}: a self-signed
certificate and key for C{ssl:} endpoints.  For testing and private
networks: clients must be given the certificate itself as their trust root.
An existing C{cert.pem} or C{key.pem} is replaced only with C{--force}.

A private CA, so that a deployment needs no other tool:
C{sockd cert --ca DIR} writes C{DIR/ca.pem} and C{DIR/ca-key.pem};
C{sockd cert --client NAME --ca-dir DIR} a client certificate it signs
(for C{[file] upload_clients}), C{sockd cert HOSTNAME --ca-dir DIR} a
server certificate it signs.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import stat
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sockd.client.exits import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from sockd.core.config import client_names
from sockd.core.logs import escape

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "add_arguments",
    "load_ca",
    "make_ca",
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
#: the files of a CA made by C{sockd cert --ca DIR}
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
#: a CA signs for ten years unless told otherwise
CA_DAYS = 3650

#: (its key, its certificate): a CA that signs
Issuer = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


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


def _key_usage(*, sign: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[bytes, bytes]:
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def _builder(
    common: str, days: int, now: datetime.datetime | None
) -> tuple[x509.CertificateBuilder, ec.EllipticCurvePrivateKey, x509.Name]:
    start = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common[:64])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A little slack for clocks that run behind.
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
    )
    return builder, key, name


def make_ca(
    common: str = "sockd private CA",
    days: int = CA_DAYS,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed CA certificate that signs end certificates only, and its key."""
    builder, key, name = _builder(common, days, now)
    cert = (
        builder.issuer_name(name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(_key_usage(sign=True, ca=True), True)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert, key)


def client_name(name: str) -> str:
    """
    C{name} checked as C{[file] upload_clients} lists names (C{ValueError}
    says what is allowed); it is the certificate's CN as given.
    """
    try:
        words = client_names(name, Path())
    except ValueError as e:
        raise ValueError(f"--client: {escape(str(e))}") from None
    if len(words) != 1 or len(name) > 64:
        raise ValueError(
            f"--client '{escape(name)}': expected one name of at most 64 "
            "characters (letters, digits, '.', '_', '@' or '-')"
        )
    return name


def make_certificate(
    hostname: str,
    days: int = 365,
    now: datetime.datetime | None = None,
    issuer: Issuer | None = None,
    client: bool = False,
) -> tuple[bytes, bytes]:
    """
    A certificate for C{hostname} (a DNS name or an IP address), valid from
    C{now} for C{days}, and its P-256 key: (cert PEM, key PEM).  Signed by
    C{issuer}, or self-signed.  C{client}: a TLS client certificate whose
    subject CN is C{hostname} (any L{client_name}), with a subjectAltName
    only if it is a DNS name.
    """
    if client:
        name = client_name(hostname)
        try:
            subject: x509.GeneralName | None = subject_name(name)
        except ValueError:
            subject = None
        if not isinstance(subject, x509.DNSName) or name.startswith("*"):
            subject = None
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    else:
        subject = subject_name(hostname)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    builder, key, own = _builder(hostname, days, now)
    if issuer is None:
        signer, issuer_name, authority = key, own, key.public_key()
    else:
        signer, issuer_name, authority = (
            issuer[0],
            issuer[1].subject,
            issuer[0].public_key(),
        )
    builder = builder.issuer_name(issuer_name)
    if subject is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([subject]), False)
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_key_usage(sign=True), True)
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), False
        )
        .sign(signer, hashes.SHA256())
    )
    return _pem(cert, key)


def load_ca(directory: Path) -> Issuer:
    """
    The CA that C{sockd cert --ca DIR} wrote in C{directory}; C{ValueError}
    saying what is missing or wrong.
    """
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path))
        key = serialization.load_pem_private_key(_read(key_path), None)
    except OSError as e:
        raise ValueError(
            f"{e.filename}: {e.strerror or e} (make a CA first: sockd cert --ca "
            f"{directory})"
        ) from None
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{directory}: not a CA made by sockd cert --ca: {e}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an elliptic-curve key")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        raise ValueError(f"{cert_path} is not a CA certificate")
    return key, cert


def _read(path: Path) -> bytes:
    """A small regular file's bytes (never a FIFO, which would block)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 1024**2:
            raise ValueError(f"{path} is not a regular file of at most 1 MiB")
        return os.read(fd, info.st_size + 1)
    finally:
        os.close(fd)


def write_pair(
    directory: Path,
    cert_pem: bytes,
    key_pem: bytes,
    force: bool = False,
    names: tuple[str, str] = ("cert.pem", "key.pem"),
) -> tuple[Path, Path]:
    """
    Write C{cert.pem} (0644) and C{key.pem} (0600, never group- or
    world-readable, even for a moment) into C{directory}.  Without
    C{force}, C{FileExistsError} if either exists (a symlink too) and
    nothing is written; with it, each is replaced whole by a rename, so a
    reader never sees a partial file and a symlink is replaced, not followed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / names[0], directory / names[1]
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
    parser.add_argument(
        "hostname",
        nargs="?",
        help="DNS name or IP address clients will use (a server certificate)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="directory for cert.pem and key.pem (default: current)",
    )
    parser.add_argument(
        "--days",
        type=int,
        help=f"validity, 1 to {MAX_DAYS} days (default 365; {CA_DAYS} for --ca)",
    )
    parser.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="replace the files written if they exist",
    )
    parser.add_argument(
        "--ca",
        metavar="DIR",
        type=Path,
        help=f"make a private CA instead: DIR/{CA_CERT} and DIR/{CA_KEY} (0600)",
    )
    parser.add_argument(
        "--client",
        metavar="NAME",
        help="make a TLS client certificate for NAME (its CN; also its DNS "
        "name if NAME is one), signed by the CA in --ca-dir",
    )
    parser.add_argument(
        "--ca-dir",
        metavar="DIR",
        type=Path,
        help="sign with the CA that sockd cert --ca DIR made (a server "
        "certificate then needs no self-signed trust)",
    )


def _usage(message: str) -> int:
    print(f"sockd cert: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    days = args.days
    if days is None:
        days = CA_DAYS if args.ca is not None else 365
    if not 1 <= days <= MAX_DAYS:
        return _usage(f"--days must be from 1 to {MAX_DAYS}")
    chosen = [args.ca is not None, args.client is not None, args.hostname is not None]
    if sum(chosen) != 1:
        return _usage("give exactly one of HOSTNAME, --ca DIR and --client NAME")
    if args.ca is not None and (args.ca_dir is not None or args.out_dir is not None):
        return _usage("--ca DIR writes into DIR: no --ca-dir or --out-dir with it")
    if args.client is not None and args.ca_dir is None:
        return _usage("--client NAME needs --ca-dir DIR, the CA that signs it")
    if args.client is not None:
        try:
            client_name(args.client)
        except ValueError as e:
            return _usage(str(e))
    issuer = None
    if args.ca_dir is not None:
        try:
            issuer = load_ca(args.ca_dir)
        except ValueError as e:
            print(f"sockd cert: {e}", file=sys.stderr)
            return EXIT_ERROR
    names = ("cert.pem", "key.pem")
    directory: Path = args.out_dir if args.out_dir is not None else Path(".")
    try:
        if args.ca is not None:
            cert_pem, key_pem = make_ca(days=days)
            directory, names = args.ca, (CA_CERT, CA_KEY)
        elif args.client is not None:
            cert_pem, key_pem = make_certificate(
                args.client, days, issuer=issuer, client=True
            )
        else:
            cert_pem, key_pem = make_certificate(args.hostname, days, issuer=issuer)
    except ValueError as e:
        return _usage(str(e))
    try:
        cert_path, key_path = write_pair(
            directory, cert_pem, key_pem, args.force, names
        )
    except FileExistsError as e:
        print(f"sockd cert: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        where = e.filename or directory
        print(f"sockd cert: {where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    if args.ca is not None:
        print(
            f"wrote {cert_path} and {key_path}; keep {key_path} private. "
            f"Servers verify client certificates with [file] client_ca = "
            f"{cert_path}; clients trust servers it signs with --cafile {cert_path}"
        )
    elif args.client is not None:
        print(
            f"wrote {cert_path} and {key_path}; upload with "
            f"sockd put --cert {cert_path} --key {key_path} ..., once the "
            f"server lists {args.client} in [file] upload_clients"
        )
    else:
        if issuer is None:
            print(WARNING.format(cert=cert_path), file=sys.stderr)
        print(
            f"wrote {cert_path} and {key_path}; listen with "
            f"ssl:PORT:privateKey={key_path}:certKey={cert_path}"
        )
    return EXIT_OK
