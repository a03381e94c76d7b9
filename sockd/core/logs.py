"""Logging helpers: untrusted bytes become one clean, escaped line."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    eventAsText,
    formatEvent,
    jsonFileLogObserver,
)
from zope.interface import implementer

__all__ = ["escape", "journal_observer", "json_observer", "prefer_journal"]

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


# --- observers for `twistd --logger` ----------------------------------------

#: syslog priorities (sd-daemon(3) "<N>" prefixes) for Twisted's levels
_PRIORITY = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


def _journal_attached(out: IO[str], environ: Mapping[str, str]) -> bool:
    # systemd sets JOURNAL_STREAM=DEV:INODE of the stream it connected;
    # matching it against our output means journald reads what we write.
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(out.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


def journal_observer(
    out: IO[str] | None = None, environ: Mapping[str, str] | None = None
) -> ILogObserver:
    """
    Log observer factory for C{twistd --logger sockd.logs.journal_observer}:
    one line per event on standard output without a timestamp (journald
    stamps each line itself).  When standard output is the journal, each
    line starts with its syslog priority (C{<6>}), which journald strips and
    records.
    """
    stream = sys.stdout if out is None else out
    env = os.environ if environ is None else environ
    prefixed = _journal_attached(stream, env)

    def format_event(event: dict[str, Any]) -> str | None:
        text = eventAsText(event, includeTimestamp=False)
        if not text:
            return None
        if not prefixed:
            return text.replace("\n", "\n\t") + "\n"
        level = event.get("log_level", LogLevel.info)
        mark = f"<{_PRIORITY.get(level, 6)}>"
        # Every line of a traceback keeps the event's priority.
        return "".join(f"{mark}{line}\n" for line in text.split("\n"))

    return FileLogObserver(stream, format_event)


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """
    Log observer factory for C{twistd --logger sockd.logs.json_observer}:
    each event as one line of JSON with its structured fields, plus
    C{text}, the formatted message, so readers need not format it again.
    """
    return _WithText(jsonFileLogObserver(sys.stdout if out is None else out, ""))


@implementer(ILogObserver)
class _WithText:
    """Adds the formatted message to each event before passing it on."""

    def __init__(self, inner: ILogObserver) -> None:
        self.inner = inner

    def __call__(self, event: dict[str, Any]) -> None:
        self.inner({**event, "text": formatEvent(event)})


def prefer_journal(
    twistd_options: MutableMapping[str, Any], environ: Mapping[str, str]
) -> bool:
    """
    Under systemd (C{JOURNAL_STREAM} or C{INVOCATION_ID} set), make a
    foreground C{twistd} that logs to standard output use
    L{journal_observer}, so journald's timestamp is the only one.  An
    explicit C{--logger} or C{--logfile FILE} wins.  True if it switched.
    """
    if twistd_options.get("logger") or not twistd_options.get("nodaemon"):
        return False
    if twistd_options.get("logfile") not in (None, "", "-"):
        return False
    if not (environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID")):
        return False
    # twistd imports the name itself once every option is parsed; the
    # public name, as the units and docs write it.
    twistd_options["logger"] = "sockd.logs.journal_observer"
    return True
