"""
What C{sockd get|ls|stat|put} are given to reach a server: a URL
(C{sockd://}, C{gopher://}, C{http://}, C{https://}) or the older
C{HOST[:PORT] PATH} pair, checked strictly (RFC 3986 syntax, no userinfo,
no fragment) into a L{Location}.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass

from sockd.client.echo import split_address
from sockd.client.fileproto import DEFAULT_PORT

__all__ = [
    "DEFAULT_PORTS",
    "SCHEMES",
    "Location",
    "framed",
    "is_url",
    "parse_url",
]

#: default port of each scheme; sockd:// is the framed protocol
DEFAULT_PORTS = {"sockd": DEFAULT_PORT, "gopher": 70, "http": 80, "https": 443}
SCHEMES = tuple(DEFAULT_PORTS)

# A registered name (DNS name, IPv4 address) in plain ASCII.
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})\Z")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Printable ASCII without space: what may appear in a URL as typed.
_URL_CHARS = re.compile(r"[\x21-\x7e]*\Z")


@dataclass(frozen=True)
class Location:
    """
    One resource: C{path} is the framed path or the Gopher selector
    (percent-decoded; undecodable bytes as surrogate escapes), or the HTTP
    request target as sent (still encoded, with any query).
    """

    scheme: str
    host: str
    port: int
    path: str
    #: the Gopher item type (the first character of the URL path)
    item: str = ""

    @property
    def server(self) -> str:
        """C{host:port}, with brackets around an IPv6 address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def name(self) -> str:
        """The last path segment, decoded: the default local file name."""
        if self.scheme in ("http", "https"):
            path = self.path.partition("?")[0].rstrip("/")
            return _decode(path.rpartition("/")[2])
        return self.path.rstrip("/").rpartition("/")[2]

    def url(self) -> str:
        """The location written as a URL (for messages)."""
        if self.scheme in ("http", "https"):
            tail = self.path
        elif self.scheme == "gopher":
            tail = "/" + self.item + _encode(self.path)
        else:
            tail = _encode(self.path if self.path.startswith("/") else "/" + self.path)
        return f"{self.scheme}://{self.server}{tail}"


def is_url(text: str) -> bool:
    """Whether an address argument is written as a URL (C{scheme://...})."""
    return "://" in text


def framed(address: str, path: str) -> Location:
    """C{HOST[:PORT]} and a path, as C{sockd get HOST PATH} takes them."""
    host, port = split_address(address, DEFAULT_PORT)
    return Location("sockd", host, port, path)


def parse_url(text: str) -> Location:
    """
    A URL into a L{Location}; C{ValueError} saying what is wrong and what
    is allowed.
    """
    if not _URL_CHARS.match(text):
        # urlsplit would silently drop tabs and newlines.
        raise ValueError(
            f"{text!r}: spaces, control and non-ASCII characters must be "
            "written %XX in a URL"
        )
    scheme, sep, _ = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"{text!r}: unsupported scheme {scheme!r}; use "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if "#" in text:
        raise ValueError(f"{text!r}: fragments (#...) are not allowed; write # as %23")
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    host, port = _netloc(text, parts.netloc, scheme)
    path = parts.path
    if _ESCAPE.search(path) or _ESCAPE.search(parts.query):
        raise ValueError(f"{text!r}: '%' must be followed by two hex digits")
    if scheme in ("http", "https"):
        target = (path or "/") + ("?" + parts.query if "?" in text else "")
        return Location(scheme, host, port, target)
    if "?" in text:
        raise ValueError(
            f"{text!r}: a query (?...) means nothing to {scheme}://; "
            "write ? in a name as %3F"
        )
    decoded = _decode(path)
    if scheme == "sockd":
        return Location(scheme, host, port, decoded)
    # RFC 4266: /<type><selector>; no path is the root menu (type 1).
    item, selector = (decoded[1], decoded[2:]) if len(decoded) > 1 else ("1", "")
    if any(ch in selector for ch in "\r\n\x00"):
        raise ValueError(f"{text!r}: CR, LF and NUL cannot be sent in a selector")
    return Location(scheme, host, port, selector, item)


def _netloc(text: str, netloc: str, scheme: str) -> tuple[str, int]:
    if not netloc:
        raise ValueError(f"{text!r}: no host after {scheme}://")
    if "@" in netloc:
        raise ValueError(
            f"{text!r}: user names and passwords (user@host) are not accepted"
        )
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: [{host}] is not an IPv6 address") from None
    else:
        host, colon, port = netloc.partition(":")
        rest = colon + port
        if ":" in port:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets: [::1]:PORT")
        if not _NAME.match(host):
            raise ValueError(
                f"{text!r}: bad host {host!r} (ASCII letters, digits, '-', '.' "
                "and '_'; an IPv6 address in brackets)"
            )
        host = host.lower()
    if not rest:
        return host, DEFAULT_PORTS[scheme]
    port = rest[1:]
    if not rest.startswith(":") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return host, int(port)


def _decode(path: str) -> str:
    return os.fsdecode(urllib.parse.unquote_to_bytes(path))


def _encode(path: str) -> str:
    return urllib.parse.quote(os.fsencode(path), safe="/")
