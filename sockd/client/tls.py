"""TLS for the blocking clients: the certificate chain and host name are checked."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import stat

from sockd.core.config import file_kind

__all__ = [
    "TLSStream",
    "add_client_certificate_arguments",
    "add_tls_arguments",
    "client_context",
]


def add_tls_arguments(parser: argparse.ArgumentParser, implies: str) -> None:
    """C{--tls} and C{--cafile}/C{--cacert}, as every subcommand spells them."""
    parser.add_argument(
        "--tls",
        action="store_true",
        help="use TLS; the server certificate must be valid for HOST",
    )
    parser.add_argument(
        "--cafile",
        "--cacert",
        metavar="PATH",
        help=f"trust the CA certificates in PATH instead of the system's ({implies})",
    )


def add_client_certificate_arguments(parser: argparse.ArgumentParser) -> None:
    """C{--cert} and C{--key}: a TLS client certificate (they imply C{--tls})."""
    parser.add_argument(
        "--cert",
        metavar="FILE",
        help="present the TLS client certificate in FILE (PEM; implies --tls), "
        "for servers that let only certain clients upload or read",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        help="the private key of --cert (PEM, not encrypted; default: in the "
        "--cert file itself)",
    )


def _regular(option: str, path: str, what: str) -> None:
    """OpenSSL would wait forever reading a FIFO: only regular files."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot load {what}: {e.strerror}") from e
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{option} {path}: cannot load {what}: it is {file_kind(mode)}, "
            "not a regular file"
        )


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; give it unencrypted")


def _load_client_certificate(
    context: ssl.SSLContext, cert: str, key: str | None
) -> None:
    _regular("--cert", cert, "the client certificate")
    if key is not None:
        _regular("--key", key, "the client key")
    shown = f"--cert {cert}" + (f" --key {key}" if key else "")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"{shown}: the key is not the certificate's (a key and "
                "certificate of different pairs)"
            ) from e
        where = "" if key else " (no --key: the key must then be in the same file)"
        raise ValueError(
            f"{shown}: cannot load a PEM certificate and its key{where}: "
            f"{e.reason or e}"
        ) from e
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ValueError(f"{shown}: cannot load: {reason}") from e


def client_context(
    cafile: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """
    A client context trusting the system CAs, or only C{cafile} when given,
    that requires a valid certificate for the host name it connects to
    (C{wrap_socket(sock, server_hostname=host)}), presenting the client
    certificate C{cert} (with C{key}) if given.  C{ValueError} if a file
    cannot be loaded, or the key is not the certificate's.
    """
    if key is not None and cert is None:
        raise ValueError("--key is the key of a --cert: give --cert too")
    try:
        # OpenSSL would wait forever reading a FIFO.
        mode = os.stat(cafile).st_mode if cafile else stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise ValueError(
                f"--cafile {cafile}: cannot load CA certificates: it is "
                f"{file_kind(mode)}, not a regular file"
            )
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or e
        raise ValueError(
            f"--cafile {cafile}: cannot load CA certificates: {reason}"
        ) from e
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        _load_client_certificate(context, cert, key)
    # The defaults already; set them here so no later change can drop them.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


class TLSStream:
    """
    TLS over a connected blocking socket that can half-close, which
    C{ssl.SSLSocket} cannot: L{close_write} sends close_notify and reading
    goes on until the server's (OpenSSL closes only the write direction).
    Errors are C{OSError}s: C{ssl.SSLCertVerificationError} for a
    certificate or host name not accepted, C{ssl.SSLEOFError} for a
    connection cut without close_notify.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname=host)

    def _flush(self) -> None:
        if data := self._out.read():
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            else:
                self._flush()
                return

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            # One record's worth at a time: sent as it is made.
            view = view[self.tls.write(view[:16384]) :]
            self._flush()

    def close_write(self) -> None:
        """Send close_notify: the server sees the end of the input."""
        # The server's own close_notify comes after its answers: not
        # waited for here.
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        self._flush()

    def recv(self) -> bytes:
        """The next bytes from the server; C{b""} at its close_notify."""
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._fill()
            except ssl.SSLZeroReturnError:
                return b""
