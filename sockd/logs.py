"""Logging helpers: untrusted bytes become one clean, escaped line."""

from __future__ import annotations

__all__ = ["escape"]

_ESCAPES = {0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def escape(data: bytes | str, limit: int = 200) -> str:
    """
    Render untrusted C{data} for a log line: printable ASCII stays, everything
    else (CR, LF, ESC, other controls, non-ASCII, invalid UTF-8) is written as
    an escape, and the result is cut at C{limit} characters of input.
    """
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    cut = raw[:limit]
    out = []
    for byte in cut:
        if byte in _ESCAPES:
            out.append(_ESCAPES[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    if len(raw) > limit:
        out.append(f"...({len(raw)} bytes)")
    return "".join(out)
