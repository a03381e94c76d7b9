"""
Configuration: one INI file in, frozen typed settings out.

This is the only module that parses or validates settings.  Every error names
the file, the section, the key, the bad value and what is allowed, so that
C{twistd} can exit before binding anything.

Lookup order for the file: C{--config PATH}, then C{$SOCKD_CONFIG}, then
C{/etc/sockd/sockd.ini}, then the default shipped inside the package.
Relative paths inside a file (the file root, TLS keys) are relative to the
directory of that file, after symlinks are resolved.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "SYSTEM_CONFIG",
    "ChatSettings",
    "Config",
    "ConfigError",
    "EchoSettings",
    "FileSettings",
    "MetricsSettings",
    "SockdSettings",
    "file_kind",
    "find_config",
    "load",
    "parse",
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

Parser = Callable[[str, Path], Any]

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")


def boolean(text: str, base: Path) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected true or false (also yes/no, on/off, 1/0)")


def integer(low: int, high: int) -> Parser:
    def parse(text: str, base: Path) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


def workers(text: str, base: Path) -> int:
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


def size(low: int, high: int) -> Parser:
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


def _number(low: float, high: float, allowed: str) -> Parser:
    def parse(text: str, base: Path) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(allowed) from None
        if value != value or not low <= value <= high:  # NaN fails too
            raise ValueError(allowed)
        return value

    return parse


def seconds(low: float, high: float) -> Parser:
    return _number(low, high, f"expected a number of seconds from {low:g} to {high:g}")


def rate(low: float, high: float) -> Parser:
    return _number(low, high, f"expected a rate from {low:g} to {high:g} per second")


def choice(*options: str) -> Parser:
    def parse(text: str, base: Path) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError("expected one of: " + ", ".join(options))
        return value

    return parse


def name(pattern: str, what: str) -> Parser:
    compiled = re.compile(pattern)

    def parse(text: str, base: Path) -> str:
        value = text.strip()
        if not compiled.fullmatch(value):
            raise ValueError(f"expected {what}")
        return value

    return parse


def text(max_length: int) -> Parser:
    def parse(value: str, base: Path) -> str:
        value = value.strip()
        if len(value) > max_length or any(
            ord(c) < 0x20 or ord(c) == 0x7F for c in value
        ):
            raise ValueError(f"expected at most {max_length} printable characters")
        return value

    return parse


def redis_url(value: str, base: Path) -> str:
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


def _endpoint_words(value: str) -> list[str]:
    # Whitespace (including newlines, for multi-line INI values) separates
    # endpoint descriptions; Twisted descriptions never contain spaces.
    return value.split()


def stream_endpoints(value: str, base: Path) -> tuple[str, ...]:
    """Twisted server endpoint descriptions (C{tcp:9000:interface=...})."""
    from twisted.internet.testing import MemoryReactor

    from sockd.core.endpoints import check_stream, stream_endpoint

    result = []
    for word in _endpoint_words(value):
        kind = word.split(":", 1)[0].lower()
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
            # Parsing with a reactor that never runs checks the syntax and,
            # for ssl:, loads the key and certificate now rather than at bind.
            stream_endpoint(MemoryReactor(), word)
        except Exception as e:
            raise ValueError(f"{word!r} is not a valid endpoint: {e}") from None
        result.append(word)
    return tuple(result)


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
    from sockd.core.endpoints import parse_datagram

    result = []
    for word in _endpoint_words(value):
        parse_datagram(word)  # raises ValueError with the reason
        result.append(word)
    return tuple(result)


# --- the settings --------------------------------------------------------


@dataclass(frozen=True)
class SockdSettings:
    """C{[sockd]}: settings shared by every service."""

    #: listen queue length for TCP listeners that do not name one
    backlog: int = 4096
    #: seconds a closing connection may take before it is aborted
    abort_grace: float = 5.0
    #: seconds a stopping daemon lets work in flight finish (SIGTERM)
    shutdown_grace: float = 30.0
    #: processes serving echo and file (this one included); see sockd.core.workers
    workers: int = 1
    #: seconds a client of an ssl: listener has to finish its TLS handshake
    tls_handshake_timeout: float = 10.0


@dataclass(frozen=True)
class EchoSettings:
    """C{[echo]}: line and raw echo over TCP, datagram echo over UDP."""

    enabled: bool = True
    listen: tuple[str, ...] = ("tcp:9000:interface=127.0.0.1",)
    listen_udp: tuple[str, ...] = ("udp:9001:interface=127.0.0.1",)
    mode: str = "line"
    transform: str = "upper"
    max_line_length: int = 8192
    line_timeout: float = 60.0
    idle_timeout: float = 300.0
    max_connections: int = 1000
    max_connections_per_ip: int = 64
    udp_max_datagram: int = 8192
    udp_rate: float = 100.0
    udp_burst: int = 200
    udp_total_rate: float = 50000.0
    udp_allow_privileged_ports: bool = False
    udp_loop_budget: int = 100
    udp_loop_pause: float = 0.5


@dataclass(frozen=True)
class ChatSettings:
    """C{[chat]}: the UDP chat relay."""

    enabled: bool = False
    listen: tuple[str, ...] = ("udp:8001:interface=127.0.0.1",)
    default_room: str = "lobby"
    idle_timeout: float = 300.0
    history: int = 20
    max_message: int = 1024
    max_members: int = 10000
    max_members_per_ip: int = 32
    max_rooms: int = 1000
    max_room_members: int = 1000
    nick_max_length: int = 16
    rate: float = 5.0
    burst: int = 10
    total_output_rate: float = 200000.0
    validation: bool = True
    backend: str = "local"
    redis_url: str = ""
    node_name: str = ""
    redis_prefix: str = "sockd:chat:"
    presence_timeout: float = 30.0
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_master: str = ""


@dataclass(frozen=True)
class FileSettings:
    """C{[file]}: the file server."""

    enabled: bool = False
    listen: tuple[str, ...] = ("tcp:8898:interface=127.0.0.1",)
    root: Path | None = None
    bare_errors: str = "close"
    bare_pause: float = 0.3
    symlinks: str = "inside"
    hidden: bool = False
    hardlinks: str = "allow"
    writable: bool = False
    overwrite: bool = False
    max_upload: int = 100 * 1024**2
    max_connections: int = 256
    max_connections_per_ip: int = 16
    request_timeout: float = 30.0
    idle_timeout: float = 300.0
    rate_limit: int = 0
    total_rate_limit: int = 0


@dataclass(frozen=True)
class MetricsSettings:
    """C{[metrics]}: Prometheus metrics over HTTP."""

    enabled: bool = False
    listen: tuple[str, ...] = ("tcp:9102:interface=127.0.0.1",)
    max_connections: int = 64


@dataclass(frozen=True)
class Config:
    """Every section's settings, and the file they came from."""

    source: str = "<defaults>"
    sockd: SockdSettings = field(default_factory=SockdSettings)
    echo: EchoSettings = field(default_factory=EchoSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    file: FileSettings = field(default_factory=FileSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


_SECONDS_DAY = 86400.0

#: section -> key -> parser; the keys must match the dataclass fields
SCHEMA: dict[str, dict[str, Parser]] = {
    "sockd": {
        "backlog": integer(1, 65535),
        "abort_grace": seconds(0.1, 600),
        "shutdown_grace": seconds(0, 3600),
        "workers": workers,
        "tls_handshake_timeout": seconds(0.1, 3600),
    },
    "echo": {
        "enabled": boolean,
        "listen": stream_endpoints,
        "listen_udp": datagram_endpoints,
        "mode": choice("line", "raw"),
        "transform": choice("upper", "none"),
        "max_line_length": size(1, 16 * 1024**2),
        "line_timeout": seconds(0.1, _SECONDS_DAY),
        "idle_timeout": seconds(0.1, _SECONDS_DAY),
        "max_connections": integer(1, 1_000_000),
        "max_connections_per_ip": integer(1, 1_000_000),
        "udp_max_datagram": size(1, 65507),
        "udp_rate": rate(0.01, 1e9),
        "udp_burst": integer(1, 1_000_000_000),
        "udp_total_rate": rate(1, 1e9),
        "udp_allow_privileged_ports": boolean,
        "udp_loop_budget": integer(0, 1_000_000_000),
        "udp_loop_pause": seconds(0.01, 60),
    },
    "chat": {
        "enabled": boolean,
        "listen": datagram_endpoints,
        "default_room": name(
            r"#?[A-Za-z0-9_-]{1,32}", "a room name of 1-32 letters, digits, '_' or '-'"
        ),
        "idle_timeout": seconds(1, _SECONDS_DAY),
        "history": integer(0, 1000),
        "max_message": size(16, 65507),
        "max_members": integer(1, 1_000_000),
        "max_members_per_ip": integer(1, 1_000_000),
        "max_rooms": integer(1, 1_000_000),
        "max_room_members": integer(1, 1_000_000),
        "nick_max_length": integer(2, 64),
        "rate": rate(0.01, 1e6),
        "burst": integer(1, 1_000_000),
        "total_output_rate": rate(1, 1e9),
        "validation": boolean,
        "backend": choice("local", "redis"),
        "redis_url": redis_url,
        "node_name": name(
            r"[A-Za-z0-9_.-]{0,64}",
            "a node name of up to 64 letters, digits, '.', '_' or '-'",
        ),
        "redis_prefix": name(
            r"[A-Za-z0-9_.:-]{1,64}",
            "a key prefix of 1-64 letters, digits, ':', '.', '_' or '-'",
        ),
        "presence_timeout": seconds(3, 3600),
        "redis_sentinels": sentinel_addresses,
        "redis_master": name(
            r"[A-Za-z0-9_.-]{0,64}",
            "a master name of up to 64 letters, digits, '.', '_' or '-'",
        ),
    },
    "file": {
        "enabled": boolean,
        "listen": stream_endpoints,
        "root": directory,
        "bare_errors": choice("close", "line"),
        "bare_pause": seconds(0.01, 60),
        "symlinks": choice("refuse", "inside"),
        "hidden": boolean,
        "hardlinks": choice("allow", "refuse"),
        "writable": boolean,
        "overwrite": boolean,
        "max_upload": size(0, 2**50),
        "max_connections": integer(1, 1_000_000),
        "max_connections_per_ip": integer(1, 1_000_000),
        "request_timeout": seconds(0.1, _SECONDS_DAY),
        "idle_timeout": seconds(0.1, _SECONDS_DAY),
        "rate_limit": size(0, 2**50),
        "total_rate_limit": size(0, 2**50),
    },
}

SCHEMA["metrics"] = {
    "enabled": boolean,
    "listen": stream_endpoints,
    "max_connections": integer(1, 10_000),
}

_SECTION_TYPES: dict[str, type[Any]] = {
    "sockd": SockdSettings,
    "echo": EchoSettings,
    "chat": ChatSettings,
    "file": FileSettings,
    "metrics": MetricsSettings,
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
) -> Config:
    """
    Parse INI text into a L{Config}, applying command-line C{overrides}
    (section -> key -> raw string) on top.  Raises L{ConfigError}.
    """
    base = base if base is not None else Path.cwd()
    parser = configparser.ConfigParser(
        interpolation=None,
        default_section="\x00no-default-section",
        strict=True,
        empty_lines_in_values=False,
        inline_comment_prefixes=None,
    )
    parser.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text_, source=source)
    except configparser.Error as e:
        raise ConfigError(f"{source}: {_one_line(str(e))}") from None

    lines = _key_lines(text_.splitlines())
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
    for section, schema in SCHEMA.items():
        values: dict[str, Any] = {}
        raw = dict(parser.items(section)) if parser.has_section(section) else {}
        for key in raw:
            if key not in schema:
                line = lines.get((section, key))
                at = f", line {line}" if line else ""
                raise ConfigError(
                    f"{source}{at}: [{section}] unknown key {key!r}; "
                    "expected one of: " + ", ".join(schema)
                )
        for key, value in raw.items():
            line = lines.get((section, key))
            at = f", line {line}" if line else ""
            values[key] = _convert(
                schema[key], value, base, f"{source}{at}", section, key
            )
        for key, value in (overrides or {}).get(section, {}).items():
            if key not in schema:
                raise ConfigError(
                    f"command line: [{section}] unknown key {key!r}; "
                    "expected one of: " + ", ".join(schema)
                )
            values[key] = _convert(
                schema[key], value, Path.cwd(), "command line", section, key
            )
        sections[section] = _SECTION_TYPES[section](**values)
    config = Config(source=source, **sections)
    _check(config)
    _check_redis(config, lines)
    return config


def _convert(
    parser: Parser, value: str, base: Path, where: str, section: str, key: str
) -> Any:
    try:
        return parser(value, base)
    except ValueError as e:
        raise ConfigError(
            f"{where}: [{section}] {key} = {_describe(value)}: {e}"
        ) from None


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _check(config: Config) -> None:
    """Rules that span keys."""
    src = config.source
    if config.echo.enabled and not (config.echo.listen or config.echo.listen_udp):
        raise ConfigError(
            f"{src}: [echo] is enabled but both listen and listen_udp are empty"
        )
    if config.echo.max_connections_per_ip > config.echo.max_connections:
        raise ConfigError(
            f"{src}: [echo] max_connections_per_ip = "
            f"{config.echo.max_connections_per_ip} is larger than "
            f"max_connections = {config.echo.max_connections}"
        )
    if config.metrics.enabled and not config.metrics.listen:
        raise ConfigError(f"{src}: [metrics] is enabled but listen is empty")
    if config.chat.enabled and not config.chat.listen:
        raise ConfigError(f"{src}: [chat] is enabled but listen is empty")
    if config.file.enabled:
        if not config.file.listen:
            raise ConfigError(f"{src}: [file] is enabled but listen is empty")
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
) -> Config:
    """Find, read and parse the configuration.  Raises L{ConfigError}."""
    path = find_config(explicit, environ)
    data = _read_regular(path)
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse(content, str(path), path.resolve().parent, overrides)


def file_kind(mode: int) -> str:
    """What a file of this C{st_mode} is, for messages: C{a FIFO}..."""
    kinds = [
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ]
    return next((what for test, what in kinds if test(mode)), "not a regular file")


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


T = TypeVar("T")


def replace(settings: T, **changes: Any) -> T:
    """A copy of frozen settings with some fields changed (for tests)."""
    return dataclasses.replace(settings, **changes)  # type: ignore[type-var]
