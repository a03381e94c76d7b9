"""TLS for the blocking clients: the certificate chain and host name are checked."""

from __future__ import annotations

import ssl

__all__ = ["client_context"]


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """
    A client context trusting the system CAs, or only C{cafile} when given,
    that requires a valid certificate for the host name it connects to
    (C{wrap_socket(sock, server_hostname=host)}).  C{ValueError} if
    C{cafile} cannot be loaded.
    """
    try:
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
