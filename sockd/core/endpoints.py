"""
Datagram endpoints, in the style of Twisted's stream endpoint strings.

Twisted parses C{tcp:...} and C{systemd:...} for streams only.  For UDP we
accept::

    udp:PORT[:interface=ADDR][:maxPacketSize=N]
    systemd:domain=INET|INET6:index=N     (a datagram socket passed by systemd)

Listening returns Twisted's own C{IListeningPort}.

L{stream_endpoint} parses Twisted's stream endpoint strings: C{systemd:}
itself, with the record of inherited sockets passed explicitly (see
L{inherited_sockets}), the others through Twisted's parser.  L{check_stream}
checks what that parser lets through to bind time.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IReactorSocket,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.python.systemd import ListenFDs

from sockd.core._twisted import systemd_record
from sockd.core.filekind import file_kind
from sockd.core.reactors import IDatagramReactor, StandInReactor

__all__ = [
    "DatagramEndpoint",
    "StreamEndpoint",
    "bind_reusing_port",
    "check_stream",
    "check_systemd_index",
    "inherited_fds",
    "inherited_sockets",
    "parse_datagram",
    "stream_endpoint",
    "use_inherited_sockets",
]

#: systemd passes sockets from this descriptor on (sd_listen_fds(3))
SD_LISTEN_FDS_START = 3

#: the positional parameters of Twisted's stream endpoint parsers, in order
_STREAM_PARAMETERS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": (
        "port",
        "privateKey",
        "certKey",
        "sslmethod",
        "interface",
        "backlog",
        "extraCertChain",
        "dhParameters",
    ),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}
#: files an ssl: endpoint reads when it is parsed
_SSL_FILES = ("privateKey", "certKey", "extraCertChain", "dhParameters")
#: the longest UNIX socket path, in bytes (sun_path holds 108, NUL included)
_UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class DatagramEndpoint:
    """Where a datagram service listens: a port to bind, or an inherited fd."""

    description: str
    port: int | None = None
    interface: str = ""
    systemd_index: int | None = None
    family: socket.AddressFamily = socket.AF_INET
    max_packet_size: int | None = None

    def listen(
        self,
        reactor: IDatagramReactor,
        protocol: DatagramProtocol,
        max_packet_size: int,
        reuse_port: bool = False,
    ) -> IListeningPort:
        size = self.max_packet_size or max_packet_size
        if self.systemd_index is not None:
            try:
                check_systemd_index(self.systemd_index)
            except ValueError as e:
                raise ValueError(f"{self.description}: {e}") from None
            fd = inherited_fds()[self.systemd_index]
            kind = socket.socket(fileno=os.dup(fd))
            try:
                if kind.type != socket.SOCK_DGRAM:
                    raise ValueError(
                        f"{self.description}: inherited descriptor {fd} is not "
                        "a datagram socket"
                    )
            finally:
                kind.close()
            # Twisted requires it; systemd passes blocking sockets, and one
            # blocking read in Port.doRead's drain loop hangs the reactor.
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
            port: IListeningPort = reactor.adoptDatagramPort(
                fd, self.family, protocol, size
            )
            return port
        assert self.port is not None
        if reuse_port:
            host = self.interface or ("::" if self.family == socket.AF_INET6 else "")
            return bind_reusing_port(
                reactor, protocol, size, self.family, host, self.port
            )
        udp: IListeningPort = reactor.listenUDP(
            self.port, protocol, interface=self.interface, maxPacketSize=size
        )
        return udp


def bind_reusing_port(
    reactor: IReactorSocket,
    protocol: DatagramProtocol,
    max_packet_size: int,
    family: socket.AddressFamily,
    host: str,
    port: int,
) -> IListeningPort:
    """
    Bind a datagram socket with C{SO_REUSEPORT}: each process of this user
    binding the same address so gets a socket of its own, and the kernel
    gives each source address to one of them.  (One socket shared by several
    processes would wake them all for every datagram.)
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((host, port))
        # Twisted serves a duplicate of the descriptor.
        udp: IListeningPort = reactor.adoptDatagramPort(
            sock.fileno(), family, protocol, max_packet_size
        )
        return udp
    finally:
        sock.close()


#: the record L{use_inherited_sockets} set, if any
_sockets: ListenFDs | None = None


def use_inherited_sockets(record: ListenFDs | None) -> None:
    """
    Look C{systemd:} endpoints up in C{record} from now on (a worker gets
    its main process's), or again in what systemd passed this process.
    """
    global _sockets
    _sockets = record


def inherited_sockets() -> ListenFDs:
    """
    The sockets C{systemd:} endpoints name: those L{use_inherited_sockets}
    set, or those systemd passed to this process (LISTEN_PID, LISTEN_FDS,
    LISTEN_FDNAMES).
    """
    if _sockets is not None:
        return _sockets
    # Importing twisted.internet.endpoints reads these variables for its own
    # systemd: endpoint and deletes them; its record is then the only one.
    recorded = systemd_record()
    if recorded.inheritedDescriptors():
        return recorded
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return ListenFDs([])
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return ListenFDs([])
    return ListenFDs(list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)))


def inherited_fds() -> list[int]:
    """Descriptors systemd passed to this process, in order."""
    return inherited_sockets().inheritedDescriptors()


@dataclass(frozen=True)
class StreamEndpoint:
    """A parsed stream endpoint description."""

    endpoint: IStreamServerEndpoint
    #: what an ssl: endpoint serves TLS with; a socket adopted for it (see
    #: L{sockd.core.workers}) needs the same
    tls: IOpenSSLServerConnectionCreator | None = None


def stream_endpoint(reactor: object, description: str) -> StreamEndpoint:
    """
    Parse a Twisted stream endpoint description; C{systemd:} ones are looked
    up in L{inherited_sockets}.  C{reactor} is only kept for C{listen()}
    (Twisted's parser types none: each kind wants its own interface).
    Errors are Twisted's parser's, or ValueError saying what is wrong.
    """
    kind = description.split(":", 1)[0]
    if kind.lower() == "systemd":  # Twisted finds plugins whatever the case
        args, kwargs = _split(description)
        return StreamEndpoint(_systemd_endpoint(reactor, args[1:], kwargs))
    if kind != "ssl":
        return StreamEndpoint(serverFromString(reactor, description))
    # An ssl: endpoint hands its settings to IReactorSSL.listenSSL: parse it
    # once against a reactor that records them.
    recorder = StandInReactor()
    serverFromString(recorder, description).listen(Factory())
    (tls,) = recorder.tls_listeners
    endpoint = SSL4ServerEndpoint(
        reactor, tls.port, tls.context, tls.backlog, tls.interface
    )
    return StreamEndpoint(endpoint, tls.context)


#: address families a systemd: stream endpoint may name
_SYSTEMD_DOMAINS = {
    "INET": socket.AF_INET,
    "INET6": socket.AF_INET6,
    "UNIX": socket.AF_UNIX,
}


def _systemd_endpoint(
    reactor: object, given: list[str], kwargs: dict[str, str]
) -> AdoptedStreamServerEndpoint:
    names = _STREAM_PARAMETERS["systemd"]
    if len(given) > len(names) or set(names[: len(given)]) & set(kwargs):
        raise ValueError("expected systemd:domain=INET:index=N or :name=NAME")
    values = {**dict(zip(names, given, strict=False)), **kwargs}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}")
    domain = values.get("domain", "").upper()
    if domain not in _SYSTEMD_DOMAINS:
        raise ValueError(
            f"domain {values.get('domain', '')!r} is not one of "
            f"{', '.join(_SYSTEMD_DOMAINS)}"
        )
    if ("index" in values) == ("name" in values):
        raise ValueError("give exactly one of index= and name=")
    record = inherited_sockets()
    if "index" in values:
        index = values["index"]
        fds = record.inheritedDescriptors()
        if not (index.isascii() and index.isdigit()):
            raise ValueError(f"index {index!r} is not a number")
        check_systemd_index(int(index), passed=fds)
        fd = fds[int(index)]
    else:
        named = record.inheritedNamedDescriptors()
        if values["name"] not in named:
            raise ValueError(
                f"systemd passed no socket named {values['name']!r} "
                f"(names: {', '.join(named) or 'none'})"
            )
        fd = named[values["name"]]
    return AdoptedStreamServerEndpoint(reactor, fd, _SYSTEMD_DOMAINS[domain])


def check_systemd_index(
    index: int,
    started_with: Mapping[str, str] | None = None,
    passed: Sequence[int] | None = None,
) -> None:
    """
    Check that systemd passed a socket at C{index}; ValueError says which
    index was asked for, how many sockets were passed and, when Twisted
    ignored them, why.  C{started_with}: the environment this process
    started with (default: read from /proc, since Twisted deletes
    C{LISTEN_FDS} once it has read it); C{passed}: the descriptors the
    index counts in (default: L{inherited_fds}).
    """
    count = len(inherited_fds() if passed is None else passed)
    if index < count:
        return
    asked = f"index {index} was asked for"
    if count:
        raise ValueError(
            f"{asked}, but systemd passed {count} socket(s), indexes 0 to "
            f"{count - 1} (the .socket unit's Listen...= lines, in order)"
        )
    env = _start_environment() if started_with is None else started_with
    given = (
        env.get("LISTEN_FDS", "") if env.get("LISTEN_PID") == str(os.getpid()) else ""
    )
    if not given.isdigit() or int(given) == 0:
        raise ValueError(
            f"{asked}, but no socket was passed to this process (LISTEN_FDS "
            "is not set for it): start the daemon through its .socket unit"
        )
    names = env.get("LISTEN_FDNAMES")
    if not names:
        why = (
            "LISTEN_FDNAMES is missing, and Twisted ignores sockets without "
            "names (systemd always names them; systemd-socket-activate needs "
            "--fdname=NAME)"
        )
    else:
        why = (
            f"LISTEN_FDNAMES names {len(names.split(':'))} socket(s), and "
            "Twisted ignores the sockets when the counts differ"
        )
    raise ValueError(
        f"{asked}; {given} socket(s) were passed (LISTEN_FDS={given}), but "
        f"none can be used: {why}"
    )


def _start_environment() -> dict[str, str]:
    """The environment this process started with, as far as /proc shows it."""
    try:
        with open("/proc/self/environ", "rb") as f:
            data = f.read()
    except OSError:
        return {}
    pairs = (entry.partition(b"=") for entry in data.split(b"\0") if entry)
    return {os.fsdecode(k): os.fsdecode(v) for k, _, v in pairs}


def _split(description: str) -> tuple[list[str], dict[str, str]]:
    # The same escaping rule as Twisted's endpoint strings: backslash quotes
    # the next character (so IPv6 addresses can be written 'interface=\:\:1').
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts:
        if "=" in part:
            key, _, value = part.partition("=")
            if key in kwargs:
                raise ValueError(f"{key!r} is given twice")
            kwargs[key] = value
        else:
            args.append(part)
    return args, kwargs


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from 0 to 65535")
    return int(text)


def check_stream(description: str) -> None:
    """
    Check a stream endpoint description for what Twisted's parser accepts
    but binding would refuse, or reading would hang on: the port (0 to
    65535), the interface (an IP address; IPv6 for C{tcp6:}), the backlog
    (1 to 65535), a UNIX socket path, the files of C{ssl:} (regular files)
    and the index of a C{systemd:} socket.  ValueError says what is wrong,
    without the description; the syntax and unknown options are left to
    Twisted's parser.
    """
    args, kwargs = _split(description)
    kind = args[0]  # as Twisted reads it: case matters
    names = _STREAM_PARAMETERS.get(kind)
    if names is None:
        return
    given = args[1:]
    if len(given) > len(names) or set(names[: len(given)]) & set(kwargs):
        raise ValueError(
            "too many ':'-separated fields (write the colons of an IPv6 address as \\:)"
        )
    values = {**dict(zip(names, given, strict=False)), **kwargs}
    if "port" in values:
        _port(values["port"])
    if "interface" in values:
        interface = values["interface"]
        if kind == "tcp6":
            valid, what = isIPv6Address(interface), "an IPv6 address"
        else:
            valid = isIPAddress(interface) or isIPv6Address(interface)
            what = "an IP address"
        if not valid:
            raise ValueError(
                f"interface {interface!r} is not {what} "
                "(leave interface= out for every address; write IPv6 colons "
                "as \\:)"
            )
    if "backlog" in values:
        backlog = values["backlog"]
        if not (backlog.isascii() and backlog.isdigit() and 1 <= int(backlog) <= 65535):
            raise ValueError(f"backlog {backlog!r} is not a number from 1 to 65535")
    if kind == "unix":
        _check_unix_path(values.get("address", ""))
    if kind == "systemd" and values.get("index", "").isdigit():
        # Counted in the record stream_endpoint looks the index up in.
        check_systemd_index(int(values["index"]))
    if kind == "ssl":
        for key in _SSL_FILES:
            if key in values or key == "privateKey":
                _check_regular(key, values.get(key, "server.pem"))


def _check_unix_path(address: str) -> None:
    if not address:
        raise ValueError("expected unix:PATH")
    if len(os.fsencode(address)) > _UNIX_PATH_MAX:
        raise ValueError(f"the socket path is longer than {_UNIX_PATH_MAX} bytes")
    parent = os.path.dirname(os.path.abspath(address))
    if not os.path.isdir(parent):
        raise ValueError(f"{parent} is not an existing directory")


def _check_regular(key: str, path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"{key}={path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{key}={path} is {file_kind(mode)}, not a regular file")


def parse_datagram(description: str) -> DatagramEndpoint:
    """Parse one datagram endpoint description; ValueError says what is wrong."""
    usage = (
        "expected udp:PORT[:interface=ADDR][:maxPacketSize=N] or "
        "systemd:domain=INET:index=N"
    )
    try:
        args, kwargs = _split(description)
    except ValueError as e:
        raise ValueError(f"{description!r}: {e}; {usage}") from None
    kind = args[0].lower() if args else ""
    size: int | None = None
    if "maxPacketSize" in kwargs:
        raw = kwargs.pop("maxPacketSize")
        if not raw.isdigit() or not 1 <= int(raw) <= 65535:
            raise ValueError(f"{description!r}: maxPacketSize must be 1 to 65535")
        size = int(raw)
    if kind == "udp":
        if len(args) != 2:
            raise ValueError(f"{description!r}: {usage}")
        interface = kwargs.pop("interface", "")
        if kwargs:
            raise ValueError(
                f"{description!r}: unknown option(s) {', '.join(sorted(kwargs))}; "
                f"{usage}"
            )
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        if interface:
            try:
                socket.inet_pton(family, interface)
            except OSError:
                raise ValueError(
                    f"{description!r}: interface {interface!r} is not an IP "
                    "address (write IPv6 colons as \\:)"
                ) from None
        try:
            port = _port(args[1])
        except ValueError as e:
            raise ValueError(f"{description!r}: {e}") from None
        return DatagramEndpoint(description, port, interface, None, family, size)
    if kind == "systemd":
        domain = kwargs.pop("domain", "INET").upper()
        index = kwargs.pop("index", "")
        if len(args) != 1 or kwargs or domain not in ("INET", "INET6"):
            raise ValueError(f"{description!r}: {usage}")
        if not index.isdigit():
            raise ValueError(f"{description!r}: index must be a number; {usage}")
        family = socket.AF_INET6 if domain == "INET6" else socket.AF_INET
        return DatagramEndpoint(description, None, "", int(index), family, size)
    raise ValueError(f"{description!r} is not a datagram endpoint; {usage}")
