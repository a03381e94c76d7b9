"""
Configuration: one INI file in, frozen typed settings out.

This is the only module that parses or validates settings.  Every error names
the file, the section, the key, the bad value and what is allowed, so that
C{twistd} can exit before binding anything.

Lookup order for the file: C{--config PATH}, then C{$SOCKD_CONFIG}, then
C{/etc/sockd/sockd.ini}, then the default shipped inside the package.
Relative paths inside a file (the file root, TLS keys) are relative to the
directory of that file, after symlinks are resolved.

A C{#} or C{;} starts a comment at the start of a line or after whitespace
(C{listen = tcp:7007   # the old port}); elsewhere it is part of the value.
A section that gives an address in one of its listen keys (C{listen},
C{listen_udp}) gets no default for the others.  A daemon reads in full only
the sections it runs (see L{parse}); a key set on the command line is not
read from the file.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from sockd.core.filekind import file_kind

__all__ = [
    "SCHEMA",
    "SYSTEM_CONFIG",
    "ChatSettings",
    "Config",
    "ConfigError",
    "EchoSettings",
    "FileSettings",
    "Key",
    "MetricsSettings",
    "SockdSettings",
    "access_of",
    "file_kind",
    "find_config",
    "is_proxied",
    "load",
    "parse",
    "setting",
]

SYSTEM_CONFIG = "/etc/sockd/sockd.ini"
ENV_VAR = "SOCKD_CONFIG"
#: the most processes C{[sockd] workers} may ask for
MAX_WORKERS = 256
#: the largest configuration file read (it is read in the reactor on SIGHUP)
MAX_CONFIG_SIZE = 1024**2


class ConfigError(Exception):
    """A setting is missing, unknown or out of range; the message says where."""


# --- value parsers -------------------------------------------------------
#
# Each parser takes the raw string and the directory relative paths resolve
# against, and returns the typed value or raises ValueError whose text says
# what is allowed.

T = TypeVar("T")
#: a value parser, giving the type of the field it fills
Parser = Callable[[str, Path], T]

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")


def boolean(text: str, base: Path) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected true or false (also yes/no, on/off, 1/0)")


def integer(low: int, high: int) -> Parser[int]:
    def parse(text: str, base: Path) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


def worker_count(text: str, base: Path) -> int:
    """A process count, or C{auto}: one per CPU this process may run on."""
    if text.strip().lower() == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:  # a seccomp filter may refuse it
            return os.cpu_count() or 1
    try:
        return int(integer(1, MAX_WORKERS)(text, base))
    except ValueError:
        raise ValueError(
            f"expected auto or a whole number from 1 to {MAX_WORKERS}"
        ) from None


def size(low: int, high: int) -> Parser[int]:
    """A byte count: C{4096}, C{64K}, C{10M}, C{1G} (powers of 1024)."""

    def parse(text: str, base: Path) -> int:
        match = _SIZE_RE.match(text)
        allowed = (
            f"expected a size from {low} to {high} bytes "
            "(a number, optionally with K, M, G or T)"
        )
        if match is None:
            raise ValueError(allowed)
        value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if not low <= value <= high:
            raise ValueError(allowed)
        return value

    return parse


def _number(low: float, high: float, allowed: str) -> Parser[float]:
    def parse(text: str, base: Path) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(allowed) from None
        if value != value or not low <= value <= high:  # NaN fails too
            raise ValueError(allowed)
        return value

    return parse


def seconds(low: float, high: float) -> Parser[float]:
    return _number(low, high, f"expected a number of seconds from {low:g} to {high:g}")


def per_second(low: float, high: float) -> Parser[float]:
    return _number(low, high, f"expected a rate from {low:g} to {high:g} per second")


def choice(*options: str) -> Parser[str]:
    def parse(text: str, base: Path) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError("expected one of: " + ", ".join(options))
        return value

    return parse


def name(pattern: str, what: str) -> Parser[str]:
    compiled = re.compile(pattern)

    def parse(text: str, base: Path) -> str:
        value = text.strip()
        if not compiled.fullmatch(value):
            raise ValueError(f"expected {what}")
        return value

    return parse


def text(max_length: int) -> Parser[str]:
    def parse(value: str, base: Path) -> str:
        value = value.strip()
        if len(value) > max_length or any(
            ord(c) < 0x20 or ord(c) == 0x7F for c in value
        ):
            raise ValueError(f"expected at most {max_length} printable characters")
        return value

    return parse


def redis_address(value: str, base: Path) -> str:
    """
    C{redis://[:PASSWORD@]HOST[:PORT][/DB]}, or empty; with sentinels, no
    HOST (checked with the other keys).
    """
    value = value.strip()
    if not value:
        return value
    allowed = "expected redis://[:PASSWORD@]HOST[:PORT][/DB]"
    try:
        url = urllib.parse.urlsplit(value)
        port, path = url.port, url.path.strip("/")
    except ValueError:
        raise ValueError(allowed) from None
    if url.scheme != "redis" or url.query or url.fragment:
        raise ValueError(allowed)
    if url.hostname is None and url.netloc.rpartition("@")[2]:
        raise ValueError(allowed)  # a port or junk where the host goes
    if port == 0 or (path and not (path.isdigit() and int(path) < 1000)):
        raise ValueError(allowed)
    return value


#: the most sentinels C{[chat] redis_sentinels} may list
MAX_SENTINELS = 16
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def sentinel_addresses(value: str, base: Path) -> tuple[tuple[str, int], ...]:
    """C{HOST:PORT} words (C{[ADDR]:PORT} for IPv6): Redis Sentinels."""
    allowed = (
        f"expected up to {MAX_SENTINELS} sentinel addresses HOST:PORT separated "
        "by spaces, e.g. 10.0.0.1:26379 10.0.0.2:26379 [::1]:26379"
    )
    found: list[tuple[str, int]] = []
    for word in value.split():
        host, _, port = word.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{word!r} is not HOST:PORT; {allowed}") from None
        elif not _HOST.fullmatch(host):
            raise ValueError(f"{word!r} is not HOST:PORT; {allowed}")
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{word!r} has no port from 1 to 65535; {allowed}")
        if (host, int(port)) in found:
            raise ValueError(f"{word!r} is listed twice; {allowed}")
        found.append((host, int(port)))
    if len(found) > MAX_SENTINELS:
        raise ValueError(allowed)
    return tuple(found)


def host_name(value: str, base: Path) -> str:
    """A DNS name or an IP address (as written), or empty."""
    value = value.strip()
    if not value:
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.removesuffix(".")
    labels = name.split(".")
    if (
        _HOST.fullmatch(name)
        and not labels[-1].isdigit()
        and all(0 < len(label) <= 63 for label in labels)
        and not any(label[0] == "-" or label[-1] == "-" for label in labels)
    ):
        return value
    raise ValueError(
        "expected a DNS name (such as gopher.example.org) or an IP address, or nothing"
    )


def optional_port(value: str, base: Path) -> int | None:
    """A TCP port from 1 to 65535, or empty (None)."""
    if not value.strip():
        return None
    try:
        return integer(1, 65535)(value, base)
    except ValueError:
        raise ValueError("expected a port from 1 to 65535, or nothing") from None


def directory(value: str, base: Path) -> Path:
    """An existing, readable directory; relative to the config file."""
    raw = value.strip()
    if not raw:
        raise ValueError("expected the path of an existing, readable directory")
    path = (base / os.path.expanduser(raw)).resolve()
    if not path.is_dir():
        raise ValueError(f"{path} is not an existing directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"{path} is not readable by this user")
    return path


def optional_path(value: str, base: Path) -> Path | None:
    raw = value.strip()
    if not raw:
        return None
    return (base / os.path.expanduser(raw)).resolve()


_STREAM_PREFIXES = ("tcp", "tcp6", "ssl", "unix", "systemd")
_BACKLOG_PREFIXES = ("tcp", "tcp6", "ssl", "unix")
#: the prefix of a listener behind a proxy sending the PROXY protocol, and
#: the listeners it may wrap (the header comes before any TLS, and a UNIX
#: socket's peer has no address to trust)
_PROXY_PREFIX = "haproxy"
_PROXIED_PREFIXES = ("tcp", "tcp6", "systemd")


#: an IPv4 or IPv6 network, as C{allow}, C{deny} and C{trusted_proxies} hold them
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: the IPv6 networks of IPv4-mapped addresses (C{::ffff:a.b.c.d})
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def networks(value: str, base: Path) -> tuple[Network, ...]:
    """
    Networks in CIDR notation, separated by whitespace (C{10.0.0.0/8
    2001:db8::/32 192.0.2.7}); a bare address is a network of one.  An
    IPv4-mapped IPv6 network (C{::ffff:10.0.0.0/104}) is read as the IPv4
    network it maps, as the addresses it holds are counted.
    """
    result: list[Network] = []
    for word in value.split():
        try:
            network = ipaddress.ip_network(word.split("%", 1)[0])
        except ValueError as e:
            raise ValueError(
                f"{word!r} is not a network ({e}); expected CIDR notation such as "
                "192.0.2.0/24, 2001:db8::/32 or a single address"
            ) from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            mapped = network.network_address.ipv4_mapped
            assert mapped is not None
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        result.append(network)
    return tuple(result)


#: a name C{[file] upload_clients} lists: a certificate's subject CN or a
#: DNS name of its subjectAltName
_CLIENT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._@-]{0,252})", re.ASCII)


def client_names(value: str, base: Path) -> tuple[str, ...]:
    """
    Certificate names separated by whitespace (C{backup.example.org
    alice}): each a subject CN or a subjectAltName DNS name, matched
    ignoring case.
    """
    result: list[str] = []
    for word in value.split():
        if not _CLIENT_NAME.fullmatch(word):
            raise ValueError(
                f"{word!r} is not a certificate name; expected names of 1-253 "
                "letters, digits, '.', '_', '@' or '-' (starting with a letter "
                "or digit), separated by spaces"
            )
        if word.lower() not in result:
            result.append(word.lower())
    return tuple(result)


def ca_file(value: str, base: Path) -> Path | None:
    """
    A PEM file of CA certificates (a regular file, holding at least one),
    relative to the config file; empty: none.
    """
    path = optional_path(value, base)
    if path is None:
        return None
    try:
        # Opened without blocking and checked: a FIFO would hang the read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_CONFIG_SIZE:
            raise ValueError(f"{path} is larger than {MAX_CONFIG_SIZE} bytes")
        data = os.read(fd, MAX_CONFIG_SIZE + 1)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)
    # Imported when a CA is named: cryptography takes a while to import.
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ValueError(f"{path} holds no PEM certificate")
    return path


def own_networks(value: str, base: Path) -> tuple[Network, ...] | None:
    """A service's L{networks}; empty (None) means those of C{[sockd]}."""
    return networks(value, base) if value.strip() else None


def _endpoint_words(value: str) -> list[str]:
    # Whitespace (including newlines, for multi-line INI values) separates
    # endpoint descriptions; Twisted descriptions never contain spaces.
    return value.split()


def stream_endpoints(value: str, base: Path) -> tuple[str, ...]:
    """Twisted server endpoint descriptions (C{tcp:9000:interface=...})."""
    # Imported when an endpoint is checked: twisted.internet.endpoints takes
    # a while to import, and a reader of the file may need none.
    from sockd.core.endpoints import check_stream, stream_endpoint
    from sockd.core.reactors import StandInReactor

    result = []
    for word in _endpoint_words(value):
        proxied = word.split(":", 1)[0].lower() == _PROXY_PREFIX
        if proxied:
            word = word.split(":", 1)[1]
        kind = word.split(":", 1)[0].lower()
        if proxied and kind not in _PROXIED_PREFIXES:
            raise ValueError(
                f"'{_PROXY_PREFIX}:{word}': the PROXY protocol is read on "
                f"{', '.join(_PROXIED_PREFIXES)} listeners only (terminate TLS "
                "at the proxy, or let it pass TLS through to an ssl: listener "
                "without send-proxy)"
            )
        if kind not in _STREAM_PREFIXES:
            raise ValueError(
                f"{word!r} is not a stream endpoint; expected descriptions "
                "such as tcp:9000:interface=127.0.0.1, tcp6:9000:interface=\\:\\:1, "
                "ssl:9443:privateKey=key.pem:certKey=cert.pem, "
                "systemd:domain=INET:index=0"
            )
        if kind == "ssl":
            word = _absolute_ssl_paths(word, base)
        try:
            # What Twisted's parser lets through to bind time (port range,
            # interface, backlog; a FIFO as a key would hang its read).
            check_stream(word)
            # Twisted's own parser checks the syntax and, for ssl:, loads the
            # key and certificate now rather than at bind.
            stream_endpoint(StandInReactor(), word)
        except Exception as e:
            raise ValueError(f"{word!r} is not a valid endpoint: {e}") from None
        result.append(f"{_PROXY_PREFIX}:{word}" if proxied else word)
    return tuple(result)


def is_proxied(description: str) -> bool:
    """Whether a stream endpoint description reads a PROXY header first."""
    return description.split(":", 1)[0].lower() == _PROXY_PREFIX


def _absolute_ssl_paths(word: str, base: Path) -> str:
    def fix(match: re.Match[str]) -> str:
        key, path = match.group(1), match.group(2)
        return f"{key}={(base / path).resolve()}"

    return re.sub(
        r"(privateKey|certKey|extraCertChain|dhParameters|caCertsDir)=([^:]+)",
        fix,
        word,
    )


def datagram_endpoints(value: str, base: Path) -> tuple[str, ...]:
    """C{udp:PORT[:interface=ADDR]} or C{systemd:domain=INET:index=N}."""
    # As above: endpoints imports twisted.internet.endpoints.
    from sockd.core.endpoints import check_systemd_index, parse_datagram

    result = []
    for word in _endpoint_words(value):
        endpoint = parse_datagram(word)  # raises ValueError with the reason
        if endpoint.systemd_index is not None:
            try:
                check_systemd_index(endpoint.systemd_index)
            except ValueError as e:
                raise ValueError(f"{word!r}: {e}") from None
        result.append(word)
    return tuple(result)


# --- the settings --------------------------------------------------------
#
# Each field of a settings dataclass is an INI key of its section: setting()
# gives its default, its parser and, for keys that are also options of the
# section's daemon, the option's help.  SCHEMA is made from these fields.

_SECONDS_DAY = 86400.0
#: the field metadata entry holding a field's L{Key}
_KEY = "sockd"


@dataclass(frozen=True)
class Key:
    """How one INI key is parsed, and how its daemon offers it as an option."""

    parser: Parser[Any]
    #: the help of its twistd option (C{--max-connections} for
    #: C{max_connections}); empty: no option of its own, only C{--set}
    doc: str = ""
    #: the option's one-letter synonym
    short: str | None = None
    #: a flag setting the key true, rather than an option taking a value
    flag: bool = False
    #: a list of values: the option may be repeated, the values are joined
    many: bool = False


def setting(
    default: T,
    parser: Parser[T],
    doc: str = "",
    *,
    short: str | None = None,
    flag: bool = False,
) -> T:
    """A settings field: its default, its INI parser and its twistd option."""
    if (short or flag) and not doc:
        raise TypeError("an option needs its help text (doc)")
    if flag and default is not False:
        raise TypeError("a flag sets a key that is false by default")
    key = Key(parser, doc, short, flag, many=isinstance(default, tuple))
    return field(default=default, metadata={_KEY: key})


@dataclass(frozen=True)
class SockdSettings:
    """C{[sockd]}: settings shared by every service."""

    #: listen queue length for TCP listeners that do not name one
    backlog: int = setting(4096, integer(1, 65535))
    #: seconds a closing connection may take before it is aborted
    abort_grace: float = setting(5.0, seconds(0.1, 600))
    #: seconds a stopping daemon lets work in flight finish (SIGTERM)
    shutdown_grace: float = setting(30.0, seconds(0, 3600))
    #: processes serving echo and file (this one included); see sockd.core.workers
    workers: int = setting(1, worker_count)
    #: seconds a client of an ssl: listener has to finish its TLS handshake
    tls_handshake_timeout: float = setting(10.0, seconds(0.1, 3600))
    #: client networks served (empty: all); see sockd.core.limits.AccessList
    allow: tuple[Network, ...] = setting((), networks)
    #: client networks refused; the more specific of allow and deny wins
    deny: tuple[Network, ...] = setting((), networks)
    #: the proxies whose PROXY header (haproxy: listeners) is believed
    trusted_proxies: tuple[Network, ...] = setting((), networks)


@dataclass(frozen=True)
class EchoSettings:
    """C{[echo]}: line and raw echo over TCP, datagram echo over UDP."""

    enabled: bool = setting(True, boolean)
    listen: tuple[str, ...] = setting(
        ("tcp:9000:interface=127.0.0.1",),
        stream_endpoints,
        "TCP endpoint to listen on (repeatable), e.g. tcp:7007.",
        short="l",
    )
    listen_udp: tuple[str, ...] = setting(
        ("udp:9001:interface=127.0.0.1",),
        datagram_endpoints,
        "UDP endpoint to listen on (repeatable), e.g. udp:7007.",
        short="u",
    )
    mode: str = setting(
        "line", choice("line", "raw"), "line or raw (RFC 862)", short="m"
    )
    transform: str = setting(
        "upper", choice("upper", "none"), "upper or none", short="t"
    )
    max_line_length: int = setting(
        8192, size(1, 16 * 1024**2), "longest line accepted, in bytes"
    )
    line_timeout: float = setting(60.0, seconds(0.1, _SECONDS_DAY))
    idle_timeout: float = setting(
        300.0,
        seconds(0.1, _SECONDS_DAY),
        "seconds a silent connection stays open",
    )
    max_connections: int = setting(1000, integer(1, 1_000_000))
    max_connections_per_ip: int = setting(64, integer(1, 1_000_000))
    udp_max_datagram: int = setting(8192, size(1, 65507))
    udp_rate: float = setting(100.0, per_second(0.01, 1e9))
    udp_burst: int = setting(200, integer(1, 1_000_000_000))
    udp_total_rate: float = setting(50000.0, per_second(1, 1e9))
    udp_allow_privileged_ports: bool = setting(False, boolean)
    udp_loop_budget: int = setting(100, integer(0, 1_000_000_000))
    udp_loop_pause: float = setting(0.5, seconds(0.01, 60))
    #: empty: [sockd]'s allow, deny and trusted_proxies
    allow: tuple[Network, ...] | None = setting(None, own_networks)
    deny: tuple[Network, ...] | None = setting(None, own_networks)
    trusted_proxies: tuple[Network, ...] | None = setting(None, own_networks)


@dataclass(frozen=True)
class ChatSettings:
    """C{[chat]}: the UDP chat relay."""

    enabled: bool = setting(False, boolean)
    listen: tuple[str, ...] = setting(
        ("udp:8001:interface=127.0.0.1",),
        datagram_endpoints,
        "UDP endpoint to listen on (repeatable), e.g. udp:8001.",
        short="l",
    )
    default_room: str = setting(
        "lobby",
        name(
            r"#?[A-Za-z0-9_-]{1,32}", "a room name of 1-32 letters, digits, '_' or '-'"
        ),
        "room new members join",
    )
    idle_timeout: float = setting(
        300.0, seconds(1, _SECONDS_DAY), "seconds a silent member stays"
    )
    history: int = setting(
        20, integer(0, 1000), "messages shown to a member joining a room"
    )
    max_message: int = setting(1024, size(16, 65507), "largest message, in bytes")
    max_members: int = setting(10000, integer(1, 1_000_000), "members in total")
    max_members_per_ip: int = setting(32, integer(1, 1_000_000))
    max_rooms: int = setting(1000, integer(1, 1_000_000), "rooms in total")
    max_room_members: int = setting(1000, integer(1, 1_000_000))
    nick_max_length: int = setting(16, integer(2, 64))
    # Seconds of a holder's silence that free its nickname: for anyone, and
    # for a member at the holder's own client address.
    nick_grace: float = setting(60.0, seconds(0, _SECONDS_DAY))
    nick_reclaim: float = setting(5.0, seconds(0, _SECONDS_DAY))
    rate: float = setting(5.0, per_second(0.01, 1e6), "messages per second per member")
    burst: int = setting(
        10, integer(1, 1_000_000), "messages a member may send at once"
    )
    total_output_rate: float = setting(200000.0, per_second(1, 1e9))
    validation: bool = setting(True, boolean, "on or off: members prove they receive")
    backend: str = setting("local", choice("local", "redis"))
    redis_url: str = setting("", redis_address)
    node_name: str = setting(
        "",
        name(
            r"[A-Za-z0-9_.-]{0,64}",
            "a node name of up to 64 letters, digits, '.', '_' or '-'",
        ),
    )
    redis_prefix: str = setting(
        "sockd:chat:",
        name(
            r"[A-Za-z0-9_.:-]{1,64}",
            "a key prefix of 1-64 letters, digits, ':', '.', '_' or '-'",
        ),
    )
    presence_timeout: float = setting(30.0, seconds(3, 3600))
    redis_sentinels: tuple[tuple[str, int], ...] = setting((), sentinel_addresses)
    redis_master: str = setting(
        "",
        name(
            r"[A-Za-z0-9_.-]{0,64}",
            "a master name of up to 64 letters, digits, '.', '_' or '-'",
        ),
    )
    #: empty: [sockd]'s allow and deny
    allow: tuple[Network, ...] | None = setting(None, own_networks)
    deny: tuple[Network, ...] | None = setting(None, own_networks)


@dataclass(frozen=True)
class FileSettings:
    """C{[file]}: the file server."""

    enabled: bool = setting(False, boolean)
    listen: tuple[str, ...] = setting(
        ("tcp:8898:interface=127.0.0.1",),
        stream_endpoints,
        "TCP endpoint to listen on (repeatable), e.g. tcp:8898.",
        short="l",
    )
    listen_http: tuple[str, ...] = setting(
        (),
        stream_endpoints,
        "TCP endpoint where every connection is HTTP (repeatable), e.g. tcp:8080.",
    )
    root: Path | None = setting(None, directory, "directory served", short="r")
    bare_errors: str = setting(
        "close", choice("close", "line"), "bare requests that fail: close or line"
    )
    bare_pause: float = setting(0.3, seconds(0.01, 60))
    symlinks: str = setting(
        "inside",
        choice("refuse", "inside"),
        "inside (follow those staying inside root) or refuse",
    )
    hidden: bool = setting(False, boolean, "serve names starting with a dot", flag=True)
    hardlinks: str = setting(
        "allow",
        choice("allow", "refuse"),
        "allow or refuse files with more than one link",
    )
    writable: bool = setting(
        False, boolean, "accept uploads (PUT)", short="w", flag=True
    )
    overwrite: bool = setting(
        False, boolean, "let uploads replace existing files", flag=True
    )
    max_upload: int = setting(
        100 * 1024**2, size(0, 2**50), "largest upload accepted, e.g. 100M"
    )
    max_connections: int = setting(256, integer(1, 1_000_000), "connections in total")
    max_connections_per_ip: int = setting(
        16, integer(1, 1_000_000), "connections per client address"
    )
    request_timeout: float = setting(
        30.0, seconds(0.1, _SECONDS_DAY), "seconds a request line may take"
    )
    idle_timeout: float = setting(
        300.0,
        seconds(0.1, _SECONDS_DAY),
        "seconds a silent connection stays open",
    )
    rate_limit: int = setting(
        0, size(0, 2**50), "bytes per second per connection (0: no cap)"
    )
    total_rate_limit: int = setting(
        0, size(0, 2**50), "bytes per second in total (0: no cap)"
    )
    max_list_entries: int = setting(10000, integer(1, 100_000))
    #: what Gopher menus advertise; empty: the address and port each client
    #: connected to (see docs/protocol-file.md, "Gopher")
    gopher_host: str = setting("", host_name)
    gopher_port: int | None = setting(None, optional_port)
    #: a file named gophermap in a directory shapes its Gopher menu
    gophermap: bool = setting(False, boolean)
    #: client networks that may PUT (with writable); see FileState.authorise_upload
    upload_allow: tuple[Network, ...] = setting((), networks)
    #: certificate names (CN or SAN DNS) that may PUT; needs client_certs
    upload_clients: tuple[str, ...] = setting((), client_names)
    #: whether ssl: listeners ask for a client certificate: none, optional
    #: (reads without one) or required (the handshake fails without one)
    client_certs: str = setting("none", choice("none", "optional", "required"))
    #: the CA certificates client certificates are verified against
    client_ca: Path | None = setting(None, ca_file)
    #: empty: [sockd]'s allow, deny and trusted_proxies
    allow: tuple[Network, ...] | None = setting(None, own_networks)
    deny: tuple[Network, ...] | None = setting(None, own_networks)
    trusted_proxies: tuple[Network, ...] | None = setting(None, own_networks)


@dataclass(frozen=True)
class MetricsSettings:
    """C{[metrics]}: Prometheus metrics over HTTP."""

    enabled: bool = setting(False, boolean)
    listen: tuple[str, ...] = setting(
        ("tcp:9612:interface=127.0.0.1",), stream_endpoints
    )
    max_connections: int = setting(64, integer(1, 10_000))


@dataclass(frozen=True)
class Config:
    """Every section's settings, and the file they came from."""

    source: str = "<defaults>"
    sockd: SockdSettings = field(default_factory=SockdSettings)
    echo: EchoSettings = field(default_factory=EchoSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    file: FileSettings = field(default_factory=FileSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


def _keys(settings: type[Any]) -> dict[str, Key]:
    """The keys of a settings dataclass, from its fields' metadata."""
    keys: dict[str, Key] = {}
    for each in fields(settings):
        if _KEY not in each.metadata:
            raise TypeError(f"{settings.__name__}.{each.name} is not a setting()")
        keys[each.name] = each.metadata[_KEY]
    return keys


#: section -> its settings class, in the order of L{Config}'s fields
_SECTION_TYPES: dict[str, type[Any]] = {
    each.name: get_type_hints(Config)[each.name]
    for each in fields(Config)
    if each.name != "source"
}
#: section -> key -> how it is parsed and offered, made from the fields
SCHEMA: dict[str, dict[str, Key]] = {
    section: _keys(settings) for section, settings in _SECTION_TYPES.items()
}


# --- loading -------------------------------------------------------------


def _key_lines(lines: Iterable[str]) -> dict[tuple[str, str], int]:
    """Map (section, key) to the 1-based line it is set on, for messages."""
    where: dict[tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip().lower()
            continue
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*[=:]", stripped)
        if match and not line[:1].isspace():
            where.setdefault((section, match.group(1).lower()), number)
    return where


def _describe(value: str) -> str:
    shown = value if len(value) <= 200 else value[:200] + "..."
    return repr(shown.strip())


def parse(
    text_: str,
    source: str = "<string>",
    base: Path | None = None,
    overrides: Mapping[str, Mapping[str, str]] | None = None,
    *,
    runs: Collection[str] | None = None,
) -> Config:
    """
    Parse INI text into a L{Config}, applying command-line C{overrides}
    (section -> key -> raw string) on top.  Raises L{ConfigError}.

    C{runs} names the services the daemon runs: their sections, C{[sockd]}
    and an enabled C{[metrics]} are read in full.  Of every other section
    only C{enabled} is read and the key names are checked, so that one file
    serves several daemons, each with its own sockets, mounts and
    credentials.  C{None} reads every section in full.
    """
    base = base if base is not None else Path.cwd()
    parser = configparser.ConfigParser(
        interpolation=None,
        default_section="\x00no-default-section",
        strict=True,
        empty_lines_in_values=False,
        # Only after whitespace, so that a#b stays one value.
        inline_comment_prefixes=("#", ";"),
    )
    parser.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text_, source=source)
    except configparser.Error as e:
        raise ConfigError(f"{source}: {_one_line(str(e))}") from None

    text_lines = text_.splitlines()
    lines = _key_lines(text_lines)
    sections: dict[str, Any] = {}
    for section in parser.sections():
        if section not in SCHEMA:
            raise ConfigError(
                f"{source}: unknown section [{section}]; "
                "expected: " + ", ".join(f"[{s}]" for s in SCHEMA)
            )
    for section, keys in (overrides or {}).items():
        if section not in SCHEMA:
            named = ", ".join(f"--set {section}.{key}" for key in keys)
            raise ConfigError(
                f"command line: {named}: unknown section [{section}]; "
                "expected: " + ", ".join(f"[{s}]" for s in SCHEMA)
            )
    where = _Where(source, base, lines, text_lines)
    read: set[str] = set()
    for section, schema in SCHEMA.items():
        raw = dict(parser.items(section)) if parser.has_section(section) else {}
        given = dict((overrides or {}).get(section, {}))
        for key in raw:
            if key not in schema:
                line = lines.get((section, key))
                at = f", line {line}" if line else ""
                raise ConfigError(
                    f"{source}{at}: [{section}] unknown key {key!r}; "
                    "expected one of: " + ", ".join(schema)
                )
        for key in given:
            if key not in schema:
                raise ConfigError(
                    f"command line: [{section}] unknown key {key!r}; "
                    "expected one of: " + ", ".join(schema)
                )

        settings = _SECTION_TYPES[section]
        values = where.convert(section, raw, given, ("enabled",))
        if (
            runs is None
            or section == "sockd"
            or section in runs
            or (section == "metrics" and values.get("enabled", settings.enabled))
        ):
            read.add(section)
            values = where.convert(section, raw, given)
            listen = [k for k in schema if k == "listen" or k.startswith("listen_")]
            if any(values.get(k) for k in listen):
                # Naming where a section listens names all of it: an address
                # of one kind must not keep the default of another.
                values.update({k: () for k in listen if k not in values})
        sections[section] = settings(**values)
    config = Config(source=source, **sections)
    _check(config, read)
    if "chat" in read:
        _check_redis(config, lines)
    return config


@dataclass(frozen=True)
class _Where:
    """The text being parsed, for converting its values and saying where."""

    source: str
    base: Path
    lines: Mapping[tuple[str, str], int]
    text: list[str]

    def convert(
        self,
        section: str,
        raw: Mapping[str, str],
        given: Mapping[str, str],
        only: Collection[str] | None = None,
    ) -> dict[str, Any]:
        """The typed values of C{section}'s keys (of C{only}), C{given} first."""
        schema = SCHEMA[section]
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if (only is not None and key not in only) or key in given:
                continue  # not read, or the command line's value wins
            line = self.lines.get((section, key))
            at = f", line {line}" if line else ""
            note = _comment_note(self.text[line - 1]) if line else ""
            values[key] = _convert(
                schema[key].parser,
                value,
                self.base,
                f"{self.source}{at}",
                section,
                key,
                note,
            )
        for key, value in given.items():
            if only is None or key in only:
                values[key] = _convert(
                    schema[key].parser, value, Path.cwd(), "command line", section, key
                )
        return values


def _convert(
    parser: Parser[Any],
    value: str,
    base: Path,
    where: str,
    section: str,
    key: str,
    note: str = "",
) -> Any:
    try:
        return parser(value, base)
    except ValueError as e:
        raise ConfigError(
            f"{where}: [{section}] {key} = {_describe(value)}: {e}{note}"
        ) from None


def _comment_note(line: str) -> str:
    """For a value refused: say that part of its line was a comment."""
    value = re.split(r"[=:]", line, maxsplit=1)[-1]
    match = re.search(r"(?:^|\s)([#;])", value)
    if match is None:
        return ""
    return (
        f" (from {match.group(1)!r} on, the line is a comment: after whitespace, "
        "'#' and ';' start one)"
    )


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _check(config: Config, read: Collection[str]) -> None:
    """Rules that span keys, in the sections read in full."""
    src = config.source
    echo = "echo" in read
    if (
        echo
        and config.echo.enabled
        and not (config.echo.listen or config.echo.listen_udp)
    ):
        raise ConfigError(
            f"{src}: [echo] is enabled but both listen and listen_udp are empty"
        )
    if echo and config.echo.max_connections_per_ip > config.echo.max_connections:
        raise ConfigError(
            f"{src}: [echo] max_connections_per_ip = "
            f"{config.echo.max_connections_per_ip} is larger than "
            f"max_connections = {config.echo.max_connections}"
        )
    for section in ("echo", "file"):
        proxied = [d for d in getattr(config, section).listen if is_proxied(d)]
        if section in read and proxied and not access_of(config, section)[2]:
            raise ConfigError(
                f"{src}: [{section}] listen = {proxied[0]} reads a PROXY header, "
                "but trusted_proxies is empty; expected the networks of the "
                "proxies (in [sockd] or [" + section + "]), e.g. "
                "trusted_proxies = 10.0.0.5/32"
            )
    if "metrics" in read and config.metrics.enabled and not config.metrics.listen:
        raise ConfigError(f"{src}: [metrics] is enabled but listen is empty")
    if "chat" in read and config.chat.enabled and not config.chat.listen:
        raise ConfigError(f"{src}: [chat] is enabled but listen is empty")
    if "file" in read and config.file.enabled:
        if not config.file.listen and not config.file.listen_http:
            raise ConfigError(
                f"{src}: [file] is enabled but listen and listen_http are empty"
            )
        both = set(config.file.listen) & set(config.file.listen_http)
        if both:
            raise ConfigError(
                f"{src}: [file] listen_http repeats {sorted(both)[0]!r} of listen; "
                "a port is either shared (listen: HTTP detected) or HTTP only"
            )
        if config.file.root is None:
            raise ConfigError(
                f"{src}: [file] is enabled but root is not set; expected the "
                "path of the directory to serve"
            )
        if config.file.writable and not os.access(config.file.root, os.W_OK):
            raise ConfigError(
                f"{src}: [file] writable = true but root {config.file.root} "
                "is not writable by this user"
            )
        _check_uploads(config)


def _check_uploads(config: Config) -> None:
    """Who may upload, and the client certificates that tells it."""
    src, file = config.source, config.file
    if file.client_certs != "none":
        if file.client_ca is None:
            raise ConfigError(
                f"{src}: [file] client_certs = {file.client_certs} but client_ca "
                "is not set; expected the PEM file of the CA that signs client "
                "certificates (sockd cert --ca DIR makes one: DIR/ca.pem)"
            )
        listeners = (*file.listen, *file.listen_http)
        if not any(d.split(":", 1)[0].lower() == "ssl" for d in listeners):
            raise ConfigError(
                f"{src}: [file] client_certs = {file.client_certs} but no listen "
                "endpoint is ssl:; client certificates come only over TLS"
            )
    elif file.client_ca is not None:
        raise ConfigError(
            f"{src}: [file] client_ca is set but client_certs = none; expected "
            "client_certs = optional or required (or no client_ca)"
        )
    if file.upload_clients and file.client_certs == "none":
        raise ConfigError(
            f"{src}: [file] upload_clients is set but client_certs = none, so no "
            "client certificate is ever asked for; expected client_certs = "
            "optional (or required) and client_ca"
        )
    if file.writable and not (file.upload_allow or file.upload_clients):
        raise ConfigError(
            f"{src}: [file] writable = true but neither upload_allow nor "
            "upload_clients is set, so nobody could upload; expected "
            "upload_allow = NETWORKS (e.g. 192.0.2.0/24, or 0.0.0.0/0 ::/0 for "
            "everyone) and/or upload_clients = CERTIFICATE NAMES"
        )


def access_of(
    config: Config, section: str
) -> tuple[tuple[Network, ...], tuple[Network, ...], tuple[Network, ...]]:
    """
    C{allow}, C{deny} and C{trusted_proxies} for C{section}: its own where
    it sets them, else C{[sockd]}'s.
    """
    own = getattr(config, section)
    shared = config.sockd
    values = []
    for key in ("allow", "deny", "trusted_proxies"):
        value = getattr(own, key, None)
        values.append(getattr(shared, key) if value is None else value)
    return values[0], values[1], values[2]


def _check_redis(config: Config, lines: Mapping[tuple[str, str], int]) -> None:
    """Where the chat's Redis is: C{redis_url}, or sentinels and a master."""
    chat = config.chat

    def at(key: str) -> str:
        line = lines.get(("chat", key))
        return f"{config.source}, line {line}" if line else config.source

    if chat.redis_sentinels:
        if not chat.redis_master:
            raise ConfigError(
                f"{at('redis_sentinels')}: [chat] redis_sentinels is set but "
                "redis_master is not; expected the name the sentinels monitor "
                "the master by (sentinel monitor NAME ...)"
            )
        if chat.redis_url and urllib.parse.urlsplit(chat.redis_url).hostname:
            raise ConfigError(
                f"{at('redis_url')}: [chat] redis_url names a host but "
                "redis_sentinels is set (the sentinels name the master); with "
                "sentinels redis_url gives only the password and database: "
                "expected redis://[:PASSWORD@]/DB, or nothing"
            )
        return
    if chat.redis_master:
        raise ConfigError(
            f"{at('redis_master')}: [chat] redis_master is set but "
            "redis_sentinels is not; expected redis_sentinels = HOST:PORT ..."
        )
    if chat.redis_url and not urllib.parse.urlsplit(chat.redis_url).hostname:
        raise ConfigError(
            f"{at('redis_url')}: [chat] redis_url has no host; expected "
            "redis://[:PASSWORD@]HOST[:PORT][/DB] (a URL with no host is only "
            "for redis_sentinels)"
        )
    if chat.backend == "redis" and not chat.redis_url:
        raise ConfigError(
            f"{at('backend')}: [chat] backend = redis but redis_url is not set; "
            "expected redis://HOST:PORT[/DB], or redis_sentinels and redis_master"
        )


def packaged_default() -> Path:
    """The default configuration shipped inside the package."""
    return Path(str(resources.files("sockd") / "data" / "sockd.ini"))


def find_config(
    explicit: str | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """Pick the file by the documented lookup order."""
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR])
    if os.path.exists(SYSTEM_CONFIG):
        return Path(SYSTEM_CONFIG)
    return packaged_default()


def load(
    explicit: str | None = None,
    overrides: Mapping[str, Mapping[str, str]] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    runs: Collection[str] | None = None,
) -> Config:
    """
    Find, read and parse the configuration for a daemon running C{runs}
    (see L{parse}).  Raises L{ConfigError}.
    """
    path = find_config(explicit, environ)
    data = _read_regular(path)
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse(content, str(path), path.resolve().parent, overrides, runs=runs)


def _read_regular(path: Path) -> bytes:
    """
    The bytes of C{path}, which must be a regular file: reading a FIFO, a
    socket or a device would block the daemon (SIGHUP reads it in the
    reactor) or never end.
    """

    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"{path}: cannot read the configuration: {reason}")

    def check(info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"it is {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_CONFIG_SIZE:
            raise refuse(f"larger than {MAX_CONFIG_SIZE} bytes")

    try:
        # Looked at first, so that nothing but a regular file is opened...
        check(os.stat(path))
        # ...and opened without blocking, then checked again: the name may
        # have been replaced (by a FIFO, say) in between.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise refuse(e.strerror or str(e)) from None
    try:
        check(os.fstat(fd))
        chunks = []
        size = 0
        while chunk := os.read(fd, MAX_CONFIG_SIZE + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_SIZE:
                raise refuse(f"larger than {MAX_CONFIG_SIZE} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise refuse(e.strerror or str(e)) from None
    finally:
        os.close(fd)
