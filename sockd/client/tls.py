"""TLS for the blocking clients: the certificate chain and host name are checked."""

from __future__ import annotations

import os
import ssl
import stat

from sockd.core.config import file_kind

__all__ = ["client_context"]


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """
    A client context trusting the system CAs, or only C{cafile} when given,
    that requires a valid certificate for the host name it connects to
    (C{wrap_socket(sock, server_hostname=host)}).  C{ValueError} if
    C{cafile} cannot be loaded.
    """
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
    # The defaults already; set them here so no later change can drop them.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context
