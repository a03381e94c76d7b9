"""
Gopher (RFC 1436) for the file service, without I/O: item types by name and
first bytes (L{item_type}), menu lines (L{MenuFormat}), error items
(L{error_item}) and gophermaps, gophernicus-style (L{parse_map}).  What is
read from disk, and every check of a selector against the jail, is the
caller's (L{sockd.files.state.MenuScan}).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ERROR_HOST",
    "MAP_NAME",
    "MAX_MAP",
    "SNIFF",
    "GopherMap",
    "Item",
    "MenuFormat",
    "advertised",
    "clean",
    "error_item",
    "item_type",
    "looks_like_text",
    "parse_map",
]

#: the host and port of items that lead nowhere (errors), as servers write them
ERROR_HOST = "error.host"
#: the file that shapes a directory's menu (with C{[file] gophermap = true})
MAP_NAME = "gophermap"
#: the largest gophermap read; a larger one is ignored
MAX_MAP = 64 * 1024
#: bytes of a file read to tell text from binary when its name does not
SNIFF = 512

TEXT = "0"
DIRECTORY = "1"
ERROR = "3"
BINARY = "9"
INFO = "i"

#: item types by file name suffix
_SUFFIXES = {
    TEXT: "txt text md rst csv tsv json ini cfg conf log py sh c h go rs js css "
    "xml yaml yml toml diff patch asc tex sql srt nfo",
    "h": "html htm xhtml",
    "g": "gif",
    "I": "png jpg jpeg jpe webp bmp tif tiff ico svg avif heic",
    "s": "wav mp3 ogg oga opus flac m4a aac mid midi au aif aiff",
    "5": "zip tar gz tgz bz2 tbz2 xz txz zst 7z rar lz lzma z",
    BINARY: "bin exe dll so o a iso img pdf deb rpm jar class mp4 mkv webm avi mov "
    "woff woff2 ttf otf db sqlite",
}
_BY_SUFFIX = {
    f".{suffix}": kind for kind, names in _SUFFIXES.items() for suffix in names.split()
}
#: the types a gophermap may give an item (RFC 1436's, and the common
#: additions: h HTML, s sound, d document, p PNG, ; video, c calendar,
#: M MIME, P PDF, x XML); never 3 (an error) and never a Gopher+ type
_MAP_TYPES = frozenset("012456789+TgIhsdp;cMPx")
#: C0 controls other than TAB, LF, FF, CR and ESC: not in text files
_BINARY_BYTES = frozenset(range(0x00, 0x09)) | {0x0B} | frozenset(range(0x0E, 0x1B))
_BINARY_BYTES |= frozenset(range(0x1C, 0x20))
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def looks_like_text(head: bytes) -> bool:
    """Whether a file's first bytes read as text: UTF-8, no NUL or odd controls."""
    if _BINARY_BYTES.intersection(head):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A character cut at the end of the prefix is still text.
        return e.reason == "unexpected end of data" and e.start >= len(head) - 3
    return True


def item_type(name: str, is_dir: bool, head: Callable[[], bytes]) -> str:
    """
    The item type of a directory entry: C{1} for a directory, else by the
    name's suffix, else (C{head()} gives the first L{SNIFF} bytes) C{0}
    for text and C{9} for anything else.
    """
    if is_dir:
        return DIRECTORY
    kind = _BY_SUFFIX.get(os.path.splitext(name)[1].lower())
    if kind is not None:
        return kind
    return TEXT if looks_like_text(head()) else BINARY


def clean(text: str) -> str:
    """A display string for a menu: a tab becomes a space, other controls C{?}."""
    return _CONTROL.sub(lambda m: " " if m.group() == "\t" else "?", text)


@dataclass(frozen=True)
class Item:
    """
    One menu line: its type, what is shown, and where it leads; C{host}
    empty means this server (the advertised address).
    """

    type: str
    display: str
    selector: str = ""
    host: str = ""
    port: int = 0


def menu_line(item: Item, host: str, port: int) -> bytes:
    """The bytes of one menu line; a local item gets the advertised address."""
    where = f"{item.host}\t{item.port}" if item.host else f"{host}\t{port}"
    line = f"{item.type}{clean(item.display)}\t{item.selector}\t{where}\r\n"
    return line.encode("utf-8")


class MenuFormat:
    """A Gopher menu (type 1): one line per L{Item}, then C{.}."""

    head = b""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def lines(self, items: list[Item]) -> bytes:
        return b"".join(menu_line(item, self.host, self.port) for item in items)

    def end(self, truncated: str) -> bytes:
        # An informational line (type i), as Gopher servers write them.
        marker = b""
        if truncated:
            info = Item(INFO, f"truncated: {truncated}")
            marker = menu_line(info, self.host, self.port)
        return marker + b".\r\n"


def error_item(code: int, reason: str) -> bytes:
    """
    A whole menu saying why a selector failed: one type-3 item (its text
    the code and the reason, as an C{ERR} line has them), then C{.}.
    """
    return menu_line(Item(ERROR, f"{code} {reason}"), ERROR_HOST, 1) + b".\r\n"


def advertised(
    host: str, port: int | None, address_host: object, address_port: object
) -> tuple[str, int]:
    """
    The host and port a menu gives its items: C{host} and C{port} (the
    settings) where set, else the address the client connected to (an
    IPv4-mapped IPv6 address as IPv4); C{localhost} and 70 where that has
    none (a UNIX socket).
    """
    if not host:
        host = "localhost"
        if isinstance(address_host, str) and address_host:
            host = address_host.split("%", 1)[0]
            try:
                mapped = ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped:
                    host = str(mapped.ipv4_mapped)
    if not port:
        port = address_port if isinstance(address_port, int) and address_port else 70
    return host, port


# --- gophermaps ------------------------------------------------------------------


@dataclass(frozen=True)
class GopherMap:
    """
    A parsed gophermap: its lines in order (info lines, and items whose
    local selectors the caller resolves), whether the directory's other
    entries follow (C{*}), and why lines were dropped (for the log).
    """

    lines: tuple[Item, ...]
    rest: bool
    dropped: tuple[str, ...]


def parse_map(data: bytes) -> GopherMap:
    """
    Read a gophermap (gophernicus-style): a line with a tab is an item,
    C{<type><display>\\t<selector>[\\t<host>[\\t<port>]]}, its selector
    relative to the directory (or the root, with a leading C{/}), or on
    another server if a host is given; a line without one is text (an info
    line); C{#} starts a comment; C{*} ends the map and lists the rest of
    the directory; C{.} ends it.  Never run: C{=} lines (gophernicus'
    executables) are dropped, and so are error items and unknown types.
    """
    lines: list[Item] = []
    dropped: list[str] = []
    rest = False
    raws = data.decode("utf-8", "replace").split("\n")
    if not raws[-1]:
        raws.pop()  # what follows the last newline: no line
    for number, raw in enumerate(raws, 1):
        line = raw.removesuffix("\r")
        if line.startswith("#"):
            continue
        if line == "*" or line.startswith("*\t"):
            rest = True
            break
        if line == ".":
            break
        if line.startswith("="):
            dropped.append(f"line {number}: programs are never run")
            continue
        if "\t" not in line:
            lines.append(Item(INFO, line))
            continue
        item, problem = _map_item(line)
        if item is None:
            dropped.append(f"line {number}: {problem}")
        else:
            lines.append(item)
    return GopherMap(tuple(lines), rest, tuple(dropped))


def _map_item(line: str) -> tuple[Item | None, str]:
    """An item line of a map, or None and why it was dropped."""
    first, selector, *where = line.split("\t")
    kind, display = first[:1], first[1:]
    if kind == INFO:
        return Item(INFO, display), ""
    if kind == ERROR:
        return None, "error items (type 3) are not taken from a map"
    if kind not in _MAP_TYPES:
        return None, f"unknown item type {kind!r}"
    if not selector:
        selector = display  # gophernicus: the display names the file
    if _CONTROL.search(selector) or "\ufffd" in selector:
        return None, "control characters or invalid UTF-8 in the selector"
    host = where[0] if where else ""
    if not host:
        return Item(kind, display, selector), ""
    if not _valid_host(host):
        return None, f"bad host {clean(host)[:64]!r}"
    port_text = where[1] if len(where) > 1 and where[1] else "70"
    if not (port_text.isascii() and port_text.isdigit()) or not (
        0 < int(port_text) < 65536
    ):
        return None, f"bad port {clean(port_text)[:16]!r}"
    return Item(kind, display, selector, host, int(port_text)), ""


def _valid_host(host: str) -> bool:
    if _HOST.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
