"""
HTTP and HTTPS downloads (RFC 9110) through the standard library's
C{http.client}: C{Range} (with C{If-Range}) to resume, C{Repr-Digest}
(RFC 9530) or C{Digest} (RFC 3230) SHA-256 to verify when the server sends
one, at most 5 redirects and never from https to http.

The validator (strong ETag, else Last-Modified) of a download in progress
is kept in C{OUT.part.meta}, so a resumed download asks for the rest only
of the same version of the file; a changed file comes back whole.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import os
import re
import ssl
import stat
import urllib.parse
from collections.abc import Callable
from email.message import Message

from sockd import __version__
from sockd.client.fileproto import (
    ConnectFailed,
    Connection,
    ProtocolError,
    ServerError,
    Truncated,
    VerifyFailed,
    sink_for,
)
from sockd.client.output import MeterFactory, Output, Writer, display, local_error
from sockd.client.tls import client_context
from sockd.client.urls import Location, parse_url
from sockd.core.text import LISTING, sanitise

__all__ = [
    "MAX_REDIRECTS",
    "content_range",
    "expected_sha256",
    "fetch",
    "read_validator",
    "validator",
]

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Where a redirect may lead: never from https down to http.
_UPGRADES = {"http": ("http", "https"), "https": ("https",)}
_META_MAX = 4096
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)\Z")
_UNSATISFIED = re.compile(r"bytes \*/([0-9]{1,19})\Z")
_FIELD_VALUE = re.compile(r"[\x20-\x7e]{1,1000}\Z")
_META = re.compile(r"If-Range: ([\x20-\x7e]{1,1000})\n\Z")


def _printable(text: str) -> str:
    """A server's text, quoted in an error: a name's escapes, 300 characters."""
    return sanitise(text, LISTING, 300)


def content_range(value: str | None) -> tuple[int, int, int | None]:
    """C{bytes FIRST-LAST/SIZE} -> (first, last, size or None for C{*})."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        raise ProtocolError(
            f"206 answer with a bad Content-Range: {_printable(value or '')!r}"
        )
    first, last = int(match.group(1)), int(match.group(2))
    size = None if match.group(3) == "*" else int(match.group(3))
    if last < first or (size is not None and last >= size):
        raise ProtocolError(f"206 answer with an impossible Content-Range: {value}")
    return first, last, size


def _sha256(text: str, header: str) -> bytes:
    try:
        digest = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise ProtocolError(f"{header}: bad sha-256 value {_printable(text)!r}")
    return digest


def expected_sha256(headers: Message) -> bytes | None:
    """
    The SHA-256 of the whole file the server announces in C{Repr-Digest}
    (C{sha-256=:BASE64:}) or C{Digest} (C{SHA-256=BASE64}), if any.
    """
    found = set()
    for value in headers.get_all("Repr-Digest") or ():
        for member in str(value).split(","):
            key, _, rest = member.partition("=")
            if key.strip().lower() == "sha-256":
                item = rest.split(";", 1)[0].strip()
                if len(item) < 2 or item[0] != ":" or item[-1] != ":":
                    raise ProtocolError(
                        f"Repr-Digest: bad sha-256 value {_printable(item)!r}"
                    )
                found.add(_sha256(item[1:-1], "Repr-Digest"))
    for value in headers.get_all("Digest") or ():
        for member in str(value).split(","):
            key, _, rest = member.partition("=")
            if key.strip().lower() == "sha-256":
                found.add(_sha256(rest.strip(), "Digest"))
    if len(found) > 1:
        raise ProtocolError("the server announced two different SHA-256 digests")
    return found.pop() if found else None


def validator(headers: Message) -> str | None:
    """What identifies this version of the file: a strong ETag, else its date."""
    etag = str(headers.get("ETag", "")).strip()
    if etag.startswith('"') and _FIELD_VALUE.match(etag):
        return etag
    modified = str(headers.get("Last-Modified", "")).strip()
    return modified if _FIELD_VALUE.match(modified) else None


def _meta_name(out: Output) -> str:
    return out.part + ".meta"


def read_validator(out: Output) -> str | None:
    """The validator kept beside a C{.part}; None if none (or unreadable)."""
    try:
        fd = os.open(
            _meta_name(out),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            dir_fd=out.dir_fd,
        )
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _META_MAX + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    match = _META.match(data.decode("ascii", "replace"))
    return match.group(1) if match else None


def _keep_validator(out: Output, value: str | None) -> None:
    name = _meta_name(out)
    try:
        if value is None:
            _forget(out)
            return
        fd = os.open(
            name,
            os.O_WRONLY
            | os.O_CREAT
            | os.O_TRUNC
            | os.O_NOFOLLOW
            | os.O_NONBLOCK
            | os.O_CLOEXEC,
            0o666,
            dir_fd=out.dir_fd,
        )
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(0, "not a regular file")
            os.write(fd, f"If-Range: {value}\n".encode("ascii"))
        finally:
            os.close(fd)
    except OSError as e:
        raise local_error(out.shown_part + ".meta", e, "cannot write") from e


def _forget(out: Output) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_meta_name(out), dir_fd=out.dir_fd)


def _request(
    location: Location,
    headers: dict[str, str],
    timeout: float,
    context: ssl.SSLContext | None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send the GET, following redirects; the connection and its answer."""
    for hop in range(MAX_REDIRECTS + 1):
        tls = None
        if location.scheme == "https":
            tls = context or client_context()
        # The socket is made (and TLS checked) the way every sockd client
        # does; http.client only speaks HTTP over it.
        sock = Connection.open(location.host, location.port, timeout, tls).sock
        connection = http.client.HTTPConnection(
            location.host, location.port, timeout=timeout
        )
        connection.sock = sock
        try:
            connection.request("GET", location.path, headers=headers)
            response = connection.getresponse()
        except BaseException as e:
            connection.close()
            mapped = _failure(location, e)
            if mapped is e:
                raise
            raise mapped from e
        if response.status not in _REDIRECTS:
            return connection, response
        target = response.getheader("Location")
        connection.close()
        if hop == MAX_REDIRECTS:
            raise ProtocolError(f"more than {MAX_REDIRECTS} redirects")
        if not target:
            raise ProtocolError(f"{response.status} redirect without a Location")
        try:
            following = parse_url(urllib.parse.urljoin(location.url(), target))
        except ValueError as e:
            raise ProtocolError(f"redirect to a bad URL: {e}") from None
        if following.scheme not in _UPGRADES[location.scheme]:
            raise ProtocolError(
                f"redirect from {location.scheme}:// to {following.scheme}:// "
                f"refused: {display(target)}"
            )
        location = following
    raise AssertionError("unreachable")


def _failure(location: Location, error: BaseException) -> BaseException:
    name = location.server
    if isinstance(error, http.client.RemoteDisconnected):
        return ConnectFailed(f"{name}: server closed the connection")
    if isinstance(error, TimeoutError):
        return ConnectFailed(f"{name}: receive failed: timed out")
    if isinstance(error, http.client.IncompleteRead):
        return ConnectFailed(f"{name}: connection closed in the middle of an answer")
    if isinstance(error, http.client.HTTPException | ValueError):
        return ProtocolError(f"{name}: bad HTTP answer: {_printable(str(error))}")
    if isinstance(error, ssl.SSLError | OSError):
        return ConnectFailed(
            f"{name}: receive failed: {getattr(error, 'strerror', None) or error}"
        )
    return error


def fetch(
    location: Location,
    out: Output | None,
    meter: MeterFactory,
    label: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    warn: Callable[[str], None] | None = None,
    stdout: int = 1,
) -> None:
    """
    GET C{location} into C{out} (from its offset, if resumed) or to the
    descriptor C{stdout}; check the announced SHA-256, if any.  C{tls}
    checks https servers (default: against the system CAs).
    """
    offset = 0 if out is None else out.offset
    if out is not None:
        out.extras.append(_meta_name(out))
    headers = {"User-Agent": f"sockd/{__version__}", "Accept": "*/*"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        known = read_validator(out) if out is not None else None
        if known is not None:
            headers["If-Range"] = known
    connection, response = _request(location, headers, timeout, tls)
    try:
        _receive(location, response, out, meter, label, stdout, warn)
    finally:
        connection.close()


def _receive(
    location: Location,
    response: http.client.HTTPResponse,
    out: Output | None,
    meter: MeterFactory,
    label: str,
    stdout: int,
    warn: Callable[[str], None] | None,
) -> None:
    offset = 0 if out is None else out.offset
    status = response.status
    length_header = response.getheader("Content-Length") or ""
    length = int(length_header) if length_header.isdigit() else None
    size: int | None
    if status == 416 and out is not None and offset:
        # Asked for the rest of a file the .part already holds whole?
        whole = _UNSATISFIED.match(response.getheader("Content-Range") or "")
        if whole is not None and int(whole.group(1)) == offset:
            meter(label, offset, offset).finish()
            out.commit()
            return
    if status == 206:
        if not offset:
            raise ProtocolError("206 partial answer to a request for the whole file")
        first, last, size = content_range(response.getheader("Content-Range"))
        if first != offset:
            raise ProtocolError(
                f"asked for bytes from {offset}, the server sent from {first}"
            )
        if length is not None and length != last - first + 1:
            raise ProtocolError("Content-Length and Content-Range disagree")
        length = last - first + 1
    elif status == 200:
        size = length
    else:
        raise ServerError(status, _printable(response.reason or "no reason given"))
    expected = expected_sha256(response.headers)
    hasher = hashlib.sha256() if expected is not None else None
    if status == 200 and offset and out is not None:
        # Only now, with a good answer in hand, is the old data given up.
        if warn is not None:
            warn(
                f"{location.server} sent the whole file (it changed, or "
                "cannot resume): starting again from 0"
            )
        out.restart()
        offset = 0
    if out is not None:
        if hasher is not None:
            out.hash_prefix(hasher)
        fd = out.open()
        _keep_validator(out, validator(response.headers))
    else:
        fd = stdout
    progress = meter(label, size, offset)
    shown = "standard output" if out is None else out.shown_part
    writer = Writer(fd, hasher, progress, offset, shown)
    received = 0
    try:
        with sink_for(writer, length) as sink:
            while True:
                view = sink.take()
                try:
                    n = response.readinto(view)
                except http.client.IncompleteRead as e:
                    # Keep what arrived (a resume fetches the rest).
                    sink.give(view[: len(e.partial)])
                    received += len(e.partial)
                    sink.close()
                    raise ConnectFailed(
                        f"{location.server}: connection closed after "
                        f"{offset + received} bytes"
                    ) from None
                except BaseException as e:
                    mapped = _failure(location, e)
                    if mapped is e:
                        raise
                    raise mapped from e
                if not n:
                    break
                sink.give(view[:n])
                received += n
            sink.close()
        if length is not None and received < length:
            raise Truncated(offset + received, offset + length)
    except BaseException:
        progress.abandon()
        raise
    progress.finish()
    if expected is not None and hasher is not None:
        got = hasher.digest()
        if got != expected:
            raise VerifyFailed(
                f"SHA-256 mismatch: received {got.hex()}, the server announced "
                f"{expected.hex()}"
            )
    if out is not None:
        out.commit()
