"""
Request paths of the file protocol, sans I/O: the rules a requested name
must follow before anything is opened (L{parse_path}), shared by the server
(L{sockd.files.paths}) and the client (C{sockd get -r} checks every name a
server lists with the same rules).
"""

from __future__ import annotations

import unicodedata

__all__ = [
    "CAUSES",
    "HIDDEN",
    "MAX_COMPONENT",
    "MAX_PATH",
    "READ_ONLY",
    "RESERVED_PREFIX",
    "UNAUTHORISED",
    "PathError",
    "parse_path",
]

#: longest path accepted, in bytes (Linux PATH_MAX counts the NUL too)
MAX_PATH = 4096
#: longest single name, in bytes (NAME_MAX)
MAX_COMPONENT = 255
#: names sockd keeps for itself (uploads in progress): never served or
#: listed, even with hidden names served, and never uploaded to
RESERVED_PREFIX = ".sockd-upload."


#: the cause a refusal names before its reason, for programs: which of its
#: code's causes it is (docs/protocol-file.md, "Errors"); a client acts on
#: the causes it knows and reads any other line by its code
HIDDEN = "hidden"
READ_ONLY = "readonly"
UNAUTHORISED = "unauthorised"
#: every cause: the code it comes with, and what it means
CAUSES: dict[str, tuple[int, str]] = {
    HIDDEN: (403, "the path names a hidden name (one starting with '.')"),
    READ_ONLY: (403, "a PUT to a server that accepts no uploads (writable = false)"),
    UNAUTHORISED: (
        403,
        "a PUT from a client that upload_allow or upload_clients does not admit",
    ),
}


class PathError(Exception):
    """
    A request that cannot be served: a protocol code, a reason for people,
    and for some refusals a cause for programs (one of L{CAUSES}).
    """

    def __init__(self, code: int, reason: str, cause: str | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"


def parse_path(raw: bytes, hidden: bool = False) -> tuple[str, ...]:
    """
    Check a requested path and split it into names; C{""} and C{"/"} are the
    root.  Raises L{PathError} saying what is wrong.
    """
    if len(raw) > MAX_PATH:
        raise PathError(414, f"path longer than {MAX_PATH} bytes")
    if b"\x00" in raw:
        raise PathError(400, "NUL byte in path")
    if b"\\" in raw:
        raise PathError(400, "backslash in path; use / between names")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError(400, "path is not valid UTF-8") from None
    if any(c < " " or "\x7f" <= c <= "\x9f" for c in text):
        raise PathError(400, "control character in path")
    parts = []
    for part in text.split("/"):
        if not part:
            continue  # leading "/" means the root; "a//b" is "a/b"
        if len(part.encode("utf-8")) > MAX_COMPONENT:
            raise PathError(414, f"path component longer than {MAX_COMPONENT} bytes")
        # Look-alikes (fullwidth dots and slashes) fold to ASCII under NFKC;
        # refuse them so no later normalisation can turn them into "..".
        folded = unicodedata.normalize("NFKC", part)
        if folded.strip(".") == "" or "/" in folded or "\\" in folded:
            raise PathError(403, "path segments . and .. are not allowed")
        if part.startswith(".") and not hidden:
            raise PathError(403, "hidden files are not served", HIDDEN)
        parts.append(part)
    return tuple(parts)
