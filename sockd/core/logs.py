"""Logging helpers: untrusted bytes become one clean, escaped line."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    eventAsText,
    formatEvent,
)
from twisted.python.failure import Failure

from sockd.core.text import JSON, LOG, sanitise

__all__ = [
    "EVENTS",
    "FIELDS",
    "escape",
    "journal_observer",
    "json_observer",
    "json_record",
    "prefer_journal",
]


def escape(data: bytes | str, limit: int = 200) -> str:
    """
    Render untrusted C{data} for a log line (the L{LOG} profile): printable
    ASCII stays, everything else (CR, LF, ESC, other controls, non-ASCII,
    invalid UTF-8) is written as an escape, and the result is cut at
    C{limit} bytes of input.
    """
    return sanitise(data, LOG, limit)


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


#: the fields a sockd event may carry into a JSON line, with their types
#: (docs/deploy.md, "Logs"); anything else is only in C{text}
FIELDS: dict[str, type] = {
    "peer": str,
    "duration": float,
    "bytes_in": int,
    "bytes_out": int,
    "outcome": str,
    "requests": int,
    "request": str,
}

#: the values of C{event}: a connection's one line at its end, or any other
EVENTS = frozenset({"connection", "message"})

_LEVELS = frozenset(level.name for level in LogLevel.iterconstants())

#: services whose logger namespace is C{sockd.<service>}, for lines that do
#: not name theirs (a log namespace, not a module to import)
_SERVICES = frozenset({"echo", "chat", "file"})


def _clean(text: str) -> str:
    # JSON cannot carry lone surrogates (undecodable bytes): escape them.
    return sanitise(text, JSON)


def json_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """
    The JSON log line of a Twisted log event, as a dict: C{time} (RFC 3339,
    UTC), C{level}, C{service}, C{event}, C{text}, then only the fields of
    L{FIELDS} that the event carries with the right type (C{worker} for a
    worker's line, C{traceback} for a failure).  Nothing of Twisted's own
    bookkeeping (C{log_logger}, C{log_flattened}, ...) gets through.
    """
    when = event.get("log_time")
    if not isinstance(when, int | float):
        when = time.time()
    level = getattr(event.get("log_level"), "name", None)
    namespace = event.get("log_namespace")
    if not isinstance(namespace, str):
        namespace = ""
    ours = namespace == "sockd" or namespace.startswith("sockd.")
    service = event.get("service") if ours else None
    if not isinstance(service, str):
        _, _, leaf = namespace.partition(".")
        service = leaf if leaf in _SERVICES else "sockd"
    kind = event.get("event") if ours else None
    record: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(when, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": level if level in _LEVELS else "info",
        "service": _clean(service),
        "event": kind if kind in EVENTS else "message",
        "text": _clean(formatEvent(dict(event))),
    }
    if ours:
        for name, kind_of in FIELDS.items():
            value = event.get(name)
            if isinstance(value, bool):
                continue  # an int to Python, never to a log reader
            if kind_of is float and isinstance(value, int):
                value = float(value)
            if isinstance(value, float) and not math.isfinite(value):
                continue  # JSON has no NaN or infinity
            if isinstance(value, kind_of):
                record[name] = _clean(value) if isinstance(value, str) else value
    worker = event.get("sockd_worker")
    if isinstance(worker, int):
        record["worker"] = worker
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = _clean(failure.getTraceback())
    return record


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """
    Log observer factory for C{twistd --logger sockd.logs.json_observer}:
    each event as one line of JSON in the schema of L{json_record}.
    """

    def format_event(event: dict[str, Any]) -> str:
        # ASCII whatever the locale: a stdout that cannot encode a name
        # would otherwise lose the line.
        return json.dumps(json_record(event)) + "\n"

    return FileLogObserver(sys.stdout if out is None else out, format_event)


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
