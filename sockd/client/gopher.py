"""
Gopher (RFC 1436, URLs per RFC 4266) downloads: the selector and CR LF
out, the item back until the server closes.  Gopher has no offsets and no
checksums, so nothing is resumed or verified; an answer that is only an
error item (type 3), an C{ERR <code>} line or nothing at all is an error.
"""

from __future__ import annotations

import os
import re

from sockd.client.fileproto import (
    CHUNK,
    EXIT_NOT_FOUND,
    EXIT_SERVER,
    ClientError,
    Connection,
    ServerError,
)
from sockd.client.output import MeterFactory, Output, Writer, display
from sockd.client.urls import Location

__all__ = ["MAX_ERROR", "GopherError", "answer_error", "fetch"]

#: an error answer is one short line; longer answers are always content
MAX_ERROR = 4096
# sockd-file with bare_errors = line
_ERR_LINE = re.compile(rb"ERR ([0-9]{3}) ([^\r\n]*)\r?\n?\Z")
# A menu line: type 3, display text, selector, host, port.
_ERROR_ITEM = re.compile(rb"3([^\t\r\n]*)\t[^\r\n]*\r?\n")
_MENU_END = re.compile(rb"(?:[^\t\r\n]*\t[^\r\n]*\r?\n|i[^\r\n]*\r?\n)*(?:\.\r?\n)?\Z")
_CODE = re.compile(r"(?:ERR )?([1-5][0-9]{2})\b[ :]*")


class GopherError(ClientError):
    """The server answered with an error item."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


def answer_error(data: bytes) -> ClientError | None:
    """
    The error a whole answer stands for (status 4 when it says "not found",
    7 otherwise), or None if it is an item's content.
    """
    if not data:
        return GopherError(
            "the server sent nothing: no such selector, or an error it does "
            "not describe (an empty file cannot be fetched over Gopher)",
            EXIT_SERVER,
        )
    if len(data) > MAX_ERROR:
        return None
    line = _ERR_LINE.match(data)
    if line is not None:
        return ServerError(int(line.group(1)), display(line.group(2)))
    item = _ERROR_ITEM.match(data)
    if item is None or not _MENU_END.match(data, item.end()):
        return None
    text = display(item.group(1)).strip()
    code = _CODE.match(text)
    if code is not None:
        return ServerError(int(code.group(1)), text[code.end() :] or text)
    status = EXIT_NOT_FOUND if "not found" in text.lower() else EXIT_SERVER
    return GopherError(f"gopher error: {text}", status)


def fetch(
    location: Location,
    out: Output | None,
    meter: MeterFactory,
    label: str,
    timeout: float,
    stdout: int = 1,
) -> None:
    """Fetch a Gopher item into C{out} (or the descriptor C{stdout})."""
    request = os.fsencode(location.path) + b"\r\n"
    with Connection.open(location.host, location.port, timeout) as connection:
        connection.send(request)
        buffer = memoryview(bytearray(CHUNK))
        head = bytearray()
        ended = False
        # Enough to tell an error answer from content.
        while len(head) <= MAX_ERROR:
            n = connection.read(buffer)
            if n == 0:
                ended = True
                break
            head += buffer[:n]
        if ended:
            error = answer_error(bytes(head))
            if error is not None:
                raise error
        fd = stdout if out is None else out.open()
        progress = meter(label, None, 0)
        shown = "standard output" if out is None else out.shown_part
        writer = Writer(fd, None, progress, 0, shown)
        try:
            writer(memoryview(head))
            while not ended and (n := connection.read(buffer)):
                writer(buffer[:n])
        except BaseException:
            progress.abandon()
            raise
        progress.finish()
    if out is not None:
        out.commit()
