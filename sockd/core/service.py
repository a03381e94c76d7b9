"""
Wiring shared by every daemon: command-line options over the INI file,
listeners for stream and datagram endpoints, and the service tree.

Each daemon's C{*_tap} module provides C{build(config, reactor)}, returning
its listeners; the all-in-one daemon asks every enabled section for its own.
"""

from __future__ import annotations

import importlib
import os
import re
import resource
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

import sockd.core.config as _config
from sockd.core.config import Config, ConfigError
from sockd.core.endpoints import bind_reusing_port, parse_datagram, stream_endpoint
from sockd.core.epoll import lean_dispatch
from sockd.core.limits import GuardedFactory
from sockd.core.logs import prefer_journal
from sockd.core.notify import Notifier

__all__ = [
    "DAEMONS",
    "DaemonOptions",
    "DescriptorLimit",
    "Listener",
    "datagram_listener",
    "descriptor_budget",
    "make_daemon_service",
    "stream_listener",
    "with_backlog",
]

log = Logger(namespace="sockd")

#: section name -> module whose build(config, reactor) makes its listeners
DAEMONS = {
    "echo": "sockd.echo.tap",
    "chat": "sockd.chat.tap",
    "file": "sockd.files.tap",
}


class Builder(Protocol):
    def __call__(self, config: Config, reactor: Any) -> list[IService]: ...


class Listener(Service):
    """
    Listens on one endpoint while running.  Binding happens in
    C{privilegedStartService}, before twistd drops privileges, and a failure
    to bind stops start-up with a message naming the endpoint.
    """

    port: IListeningPort | None = None

    def __init__(
        self,
        service: str,
        description: str,
        listen: Callable[[], Any],
        target: object = None,
        adopt: Callable[[int, socket.AddressFamily], IListeningPort] | None = None,
        rebind: Callable[[str, int], IListeningPort] | None = None,
    ) -> None:
        self.service = service
        self.description = description
        self._listen = listen
        self._inherited = False
        #: the factory or datagram protocol serving this endpoint
        self.target = target
        self._adopt = adopt
        self._rebind = rebind
        self.setName(f"{service} {description}")

    def rebind(self, host: str, port: int) -> None:
        """
        Bind a socket of our own beside the main process's, sharing its
        address (C{SO_REUSEPORT}, see L{datagram_listener}).
        """
        bind = self._rebind
        if bind is None:
            raise ValueError(f"{self.service} {self.description} cannot be shared")
        self._listen = lambda: bind(host, port)
        self._inherited = True

    def shared_address(self) -> tuple[str, int] | None:
        """Where workers bind beside us, or None if they inherit the socket."""
        if self._rebind is None or self.port is None:
            return None
        address: Any = self.port.getHost()
        return str(address.host), int(address.port)

    def inherit(self, fd: int) -> None:
        """
        Serve the socket at descriptor C{fd}, bound by another process (see
        L{sockd.core.workers}), instead of binding.
        """
        adopt = self._adopt
        if adopt is None:
            raise ValueError(f"{self.service} {self.description} cannot be shared")

        def listen() -> IListeningPort:
            with socket.socket(fileno=os.dup(fd)) as probe:
                family = probe.family
            port = adopt(fd, family)
            # Twisted serves a duplicate: the inherited descriptor can go.
            os.close(fd)
            return port

        self._listen = listen
        self._inherited = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        self._bind()

    def _bind(self) -> None:
        if self.port is not None:
            return
        try:
            result = self._listen()
        except Exception as e:
            raise SystemExit(self._failed(e)) from None
        if isinstance(result, Deferred):
            outcome: list[Any] = []
            result.addBoth(outcome.append)
            if not outcome:
                raise SystemExit(
                    f"{self.service}: {self.description}: did not "
                    "bind at once; asynchronous endpoints are not "
                    "supported"
                )
            if isinstance(outcome[0], Failure):
                raise SystemExit(self._failed(outcome[0].value or Exception()))
            result = outcome[0]
        self.port = result
        kind, where = self.where()
        # A worker serving an inherited socket says so once, when ready.
        log.emit(
            LogLevel.debug if self._inherited else LogLevel.info,
            "{service}: listening on {kind} {where}",
            service=self.service,
            kind=kind,
            where=where,
            description=self.description,
        )

    def where(self) -> tuple[str, str]:
        """(C{TCP}/C{UDP}/C{UNIX}, address) of the bound port."""
        assert self.port is not None
        address: Any = self.port.getHost()
        kind = getattr(address, "type", "UNIX")
        if hasattr(address, "port"):
            return kind, f"{address.host}:{address.port}"
        return kind, str(getattr(address, "name", address))

    def _failed(self, error: BaseException) -> str:
        return f"sockd: {self.service} cannot listen on {self.description}: {error}"

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        result = port.stopListening()
        return result if isinstance(result, Deferred) else None


def with_backlog(description: str, backlog: int) -> str:
    """Add C{backlog=} to a listening description that has none."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and not re.search(
        r"(^|:)backlog=", description
    ):
        return f"{description}:backlog={backlog}"
    return description


def stream_listener(
    service: str, description: str, factory: Factory, reactor: Any, backlog: int
) -> Listener:
    parsed = stream_endpoint(reactor, with_backlog(description, backlog))
    endpoint = parsed.endpoint

    def adopt(fd: int, family: socket.AddressFamily) -> IListeningPort:
        served: Any = factory
        # An ssl: endpoint wraps the factory as it listens; so must we.
        if parsed.tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            served = TLSMemoryBIOFactory(parsed.tls, False, factory)
        port: IListeningPort = reactor.adoptStreamPort(fd, family, served)
        return port

    return Listener(
        service, description, lambda: endpoint.listen(factory), factory, adopt
    )


def datagram_listener(
    service: str,
    description: str,
    protocol: DatagramProtocol,
    reactor: Any,
    max_packet_size: int,
    reuse_port: bool = False,
) -> Listener:
    """
    With C{reuse_port} (C{[sockd] workers} > 1), a UDP port is bound with
    C{SO_REUSEPORT} and each worker binds its own socket beside it; a socket
    passed by systemd is shared as it is.
    """
    endpoint = parse_datagram(description)
    size = endpoint.max_packet_size or max_packet_size

    def adopt(fd: int, family: socket.AddressFamily) -> IListeningPort:
        port: IListeningPort = reactor.adoptDatagramPort(fd, family, protocol, size)
        return port

    def rebind(host: str, port: int) -> IListeningPort:
        return bind_reusing_port(reactor, protocol, size, endpoint.family, host, port)

    reusing = reuse_port and endpoint.systemd_index is None
    return Listener(
        service,
        description,
        lambda: endpoint.listen(reactor, protocol, max_packet_size, reusing),
        protocol,
        adopt,
        rebind if reusing else None,
    )


def builder(section: str) -> Builder:
    module = importlib.import_module(DAEMONS[section])
    build: Builder = module.build
    return build


def make_daemon_service(
    config: Config,
    sections: Sequence[str],
    reactor: Any = None,
    loader: Callable[[], Config] | None = None,
    overrides: Mapping[str, Mapping[str, str]] | None = None,
    *,
    inherited: Mapping[tuple[str, str], int | tuple[str, int]] | None = None,
) -> MultiService:
    """
    One service holding the listeners of each of C{sections}, and the
    workers C{[sockd] workers} asks for (they load the same file with the
    same C{overrides}).

    In a worker, C{inherited} maps (section, description) to the descriptor
    of the socket the main process bound, or to the (host, port) to bind
    beside it: those are served; no metrics page, no readiness notice and
    no further workers.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    lean_dispatch(reactor)
    top = MultiService()
    if inherited is None:
        # First: workers inherit the raised limit.
        DescriptorLimit(config, sections).setServiceParent(top)
    for section in sections:
        for child in builder(section)(config, reactor):
            if inherited is not None:
                assert isinstance(child, Listener)
                fd = inherited.get((child.service, child.description))
                if fd is None:
                    log.warn(
                        "sockd: {service} {description} is not in the main "
                        "process's listeners (the file changed?); not served "
                        "here until a restart",
                        service=child.service,
                        description=child.description,
                    )
                    continue
                if isinstance(fd, int):
                    child.inherit(fd)
                else:
                    child.rebind(*fd)
            child.setServiceParent(top)
    lifecycle = Lifecycle(config, sections, reactor, loader)
    if inherited is not None:
        lifecycle.setServiceParent(top)
        return top
    #: counted on the metrics page beside the listeners' targets
    counted: list[Any] = []
    if config.sockd.workers > 1:
        import sockd.core.workers as workers

        shared = workers.shareable(sections)
        if len(shared) < len(sections):
            log.info(
                "sockd: chat is served by the main process only: its members "
                "and rooms live in one process{more}",
                more="" if shared else "; no worker started",
            )
        if shared:
            supervisor = workers.Workers(
                config.sockd.workers - 1,
                {
                    "config": os.path.abspath(config.source),
                    "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
                    "sections": shared,
                    "metrics": config.metrics.enabled,
                },
                reactor,
                grace=config.sockd.shutdown_grace + config.sockd.abort_grace + 5,
            )
            supervisor.setServiceParent(top)
            counted.append(supervisor)
    if config.metrics.enabled:
        from twisted.web.server import Site

        import sockd.core.metrics as metrics

        collector = metrics.SockdCollector(
            lambda: [target for _, target in lifecycle.targets()] + counted, reactor
        )
        site = Site(
            metrics.resource(collector), timeout=metrics.IDLE_TIMEOUT, reactor=reactor
        )
        site.noisy = False
        capped = metrics.CappedFactory(
            site, config.metrics.max_connections, reactor, config.sockd.abort_grace
        )
        for description in config.metrics.listen:
            stream_listener(
                "metrics",
                description,
                capped,  # type: ignore[arg-type]
                reactor,
                config.sockd.backlog,
            ).setServiceParent(top)
    # Before Ready: once systemd hears READY=1 it may send SIGHUP at once
    # (systemctl reload), and without the handler SIGHUP kills the process.
    lifecycle.setServiceParent(top)
    Ready(sections, reactor).setServiceParent(top)
    return top


#: descriptors held whatever the load: standard streams, the log, epoll and
#: the reactor's waker, the sd_notify socket, the file root, and room for
#: modules, certificates and DNS look-ups opened on the way
RESERVED_DESCRIPTORS = 64
#: descriptors one file connection may hold: its socket, and the file sent
#: (or, with writable = true, the directory and temporary file of an upload)
FILE_DESCRIPTORS = {False: 2, True: 3}
#: the main process's pipes to each worker (its stdin, stdout and stderr)
WORKER_PIPES = 3
#: connections to Redis of a chat node with backend = redis
REDIS_CONNECTIONS = 2


def descriptor_budget(config: Config, sections: Sequence[str]) -> list[tuple[str, int]]:
    """
    The descriptors one process may hold at once when every cap is reached,
    as (what, how many), naming the key that sets each.  Workers hold no
    more than the main process: the same caps, no metrics page, no pipes.
    """
    listeners = 0
    for section in sections:
        settings = getattr(config, section)
        listeners += len(settings.listen) + len(getattr(settings, "listen_udp", ()))
    budget = [("reserve", RESERVED_DESCRIPTORS)]
    if "echo" in sections and config.echo.listen:
        budget.append(("[echo] max_connections", config.echo.max_connections))
    if "file" in sections and config.file.listen:
        each = FILE_DESCRIPTORS[config.file.writable]
        budget.append(
            (f"[file] max_connections x {each}", config.file.max_connections * each)
        )
    if config.metrics.enabled:
        listeners += len(config.metrics.listen)
        budget.append(("[metrics] max_connections", config.metrics.max_connections))
    if "chat" in sections and config.chat.backend == "redis":
        budget.append(("redis", REDIS_CONNECTIONS))
    if config.sockd.workers > 1 and {"echo", "file"} & set(sections):
        budget.append(
            ("[sockd] workers' pipes", WORKER_PIPES * (config.sockd.workers - 1))
        )
    budget.append(("listeners", listeners))
    return budget


class DescriptorLimit(Service):
    """
    Started first, in the main process: raises the soft limit on open
    descriptors (C{RLIMIT_NOFILE}) to the hard one, and warns when the caps
    of the services (L{descriptor_budget}) can add up to more, naming the
    keys to lower: past the limit, C{accept()} and C{open()} fail with
    C{EMFILE} for clients within the caps.  Checked again on reload.
    """

    #: the limit in force once raised; None: no limit
    limit: int | None = None

    def __init__(
        self,
        config: Config,
        sections: Sequence[str],
        getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
        setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    ) -> None:
        self.config = config
        self.sections = list(sections)
        self.getrlimit = getrlimit
        self.setrlimit = setrlimit
        self._raised = False
        self.setName("descriptors")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._start()

    def startService(self) -> None:
        super().startService()
        self._start()

    def _start(self) -> None:
        if self._raised:
            return
        self._raised = True
        self.limit = self.raise_limit()
        self.check(self.config)

    def raise_limit(self) -> int | None:
        """Raise the soft limit to the hard one; return the limit in force."""
        soft, hard = self.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return None
        # Linux allows no infinite descriptor limit: keep the soft one then.
        if hard == resource.RLIM_INFINITY or soft >= hard:
            return soft
        try:
            self.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            # A sandbox (seccomp, a container) may forbid it.
            log.info(
                "sockd: could not raise the open files limit from {soft} to "
                "{hard}: {error}",
                soft=soft,
                hard=hard,
                error=e,
            )
            return soft
        log.info(
            "sockd: open files limit raised from {soft} to {hard}",
            soft=soft,
            hard=hard,
        )
        return hard

    def check(self, config: Config) -> bool:
        """Warn if C{config}'s caps can need more than the limit; False then."""
        budget = descriptor_budget(config, self.sections)
        needed = sum(count for _, count in budget)
        if self.limit is None or needed <= self.limit:
            return True
        keys = [what.split(" x ")[0] for what, _ in budget if "max_conn" in what]
        log.warn(
            "sockd: the connection caps can need {needed} open files "
            "({parts}) but this process may open {limit} (RLIMIT_NOFILE): "
            "past it, clients within the caps fail (EMFILE) instead of being "
            "refused with a message; lower {keys}, or raise the limit "
            "(LimitNOFILE= in the systemd unit, ulimit -n before starting)",
            needed=needed,
            parts=", ".join(f"{what} {count}" for what, count in budget),
            limit=self.limit,
            keys=" or ".join(keys),
        )
        return False

    def reloaded(self, config: Config) -> None:
        self.config = config
        self.check(config)


class Lifecycle(Service):
    """
    Graceful stop and reload for every service in the tree.

     - Stopping (SIGTERM): each factory with a C{drain(deadline)} method is
       asked to let work in flight finish, for up to C{shutdown_grace}.
     - SIGHUP: C{loader} reads the configuration again; each factory or
       datagram protocol with C{reconfigure(settings, shared)} gets its
       section's new settings.  An invalid file is logged and ignored.
     - At start and on each reload, every L{GuardedFactory} gets the
       C{[sockd]} settings its connections use (the TLS handshake timeout).
    """

    def __init__(
        self,
        config: Config,
        sections: Sequence[str],
        reactor: Any,
        loader: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.sections = list(sections)
        self.reactor = reactor
        self.loader = loader
        self._previous: Any = None
        self.setName("lifecycle")

    def targets(self) -> list[tuple[str, Any]]:
        """(section, factory or protocol) for each listener, once each."""
        seen: dict[int, tuple[str, Any]] = {}
        for child in self.parent or ():
            target = getattr(child, "target", None)
            if isinstance(child, Listener) and target is not None:
                seen.setdefault(id(target), (child.service, target))
        return list(seen.values())

    def _share(self, config: Config) -> None:
        for _, target in self.targets():
            if isinstance(target, GuardedFactory):
                target.handshake_timeout = config.sockd.tls_handshake_timeout

    def startService(self) -> None:
        super().startService()
        self._share(self.config)
        if self.loader is not None and threading.current_thread() is (
            threading.main_thread()
        ):
            self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes: hand over to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Read the configuration again and apply it; False if invalid."""
        assert self.loader is not None
        try:
            new = self.loader()
        except ConfigError as e:
            log.error(
                "sockd: reload refused, running settings kept: {error}", error=str(e)
            )
            return False
        for section, target in self.targets():
            old_settings = getattr(self.config, section)
            new_settings = getattr(new, section)
            for key in ("listen", "listen_udp", "enabled"):
                if getattr(old_settings, key, None) != getattr(new_settings, key, None):
                    log.warn(
                        "sockd: [{section}] {key} changed; it applies at the "
                        "next restart",
                        section=section,
                        key=key,
                    )
            reconfigure = getattr(target, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(new_settings, new.sockd)
        self._share(new)
        self.config = new
        log.info("sockd: configuration reloaded from {source}", source=new.source)
        for sibling in self.parent or ():
            reloaded = getattr(sibling, "reloaded", None)
            if reloaded is not None:
                reloaded(new)
        return True

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        waits = [
            target.drain(self.config.sockd.shutdown_grace)
            for _, target in self.targets()
            if hasattr(target, "drain")
        ]
        if not waits:
            return None
        log.info(
            "sockd: stopping; letting work in flight finish (up to {grace}s)",
            grace=self.config.sockd.shutdown_grace,
        )
        return gatherResults(waits)


class Ready(Service):
    """
    Started last: every listener is bound.  Says so, once, in the log and
    to systemd (C{READY=1} and a C{STATUS=} summary, see L{sockd.core.notify}),
    then pings the watchdog if systemd asks; C{STOPPING=1} when stopped.
    """

    notifier: Notifier | None = None

    def __init__(
        self,
        sections: Sequence[str],
        reactor: Any = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.sections = list(sections)
        self.reactor = reactor
        self.environ = environ
        self.setName("ready")

    def startService(self) -> None:
        super().startService()
        log.info("sockd: ready: {services}", services=" ".join(self.sections))
        clock = self.reactor if IReactorTime.providedBy(self.reactor) else None
        environ = os.environ if self.environ is None else self.environ
        self.notifier = Notifier(environ, clock)
        self.notifier.ready(self.summary())
        self.notifier.start_watchdog()

    def summary(self) -> str:
        """One line: each service and where it listens."""
        where: dict[str, list[str]] = {s: [] for s in self.sections}
        for child in self.parent or ():
            if isinstance(child, Listener) and child.port is not None:
                kind, spot = child.where()
                where.setdefault(child.service, []).append(f"{kind} {spot}")
        return "; ".join(
            f"{service}: {', '.join(spots) or 'no listener'}"
            for service, spots in where.items()
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.notifier is not None:
            self.notifier.stopping()
            self.notifier.close()
            self.notifier = None
        return None


class DaemonOptions(usage.Options):
    """
    Options every daemon shares: which INI file, and C{--set} overrides.
    Subclasses name their C{section}, map their own options to keys in
    C{keyOptions} (option name -> key), and collect repeatable ones (such
    as C{--listen}) with L{_add_list}.
    """

    section = ""
    keyOptions: dict[str, str] = {}

    optParameters: list[list[Any]] = [
        [
            "config",
            "c",
            None,
            "INI file (default: $SOCKD_CONFIG, "
            f"{_config.SYSTEM_CONFIG}, then the packaged default)",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.overrides: dict[str, dict[str, str]] = {}
        self.lists: dict[str, list[str]] = {}

    def opt_set(self, assignment: str) -> None:
        """Override one setting: KEY=VALUE, or SECTION.KEY=VALUE."""
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise usage.UsageError(f"--set expects KEY=VALUE, not {assignment!r}")
        section, dot, name = key.strip().rpartition(".")
        if not dot:
            section = self.section
        if not section:
            raise usage.UsageError(f"--set expects SECTION.KEY=VALUE, not {key!r}")
        self.overrides.setdefault(section.lower(), {})[name.lower()] = value

    def load(self) -> Config:
        """Read the configuration these options name (again, on SIGHUP)."""
        return _config.load(self["config"], self.overrides)

    def make_service(
        self, sections: Sequence[str], reactor: Any = None
    ) -> MultiService:
        """
        L{make_daemon_service} for these options: reloads and workers read
        the same file with the same overrides.
        """
        return make_daemon_service(
            self.config,
            sections,
            reactor,
            loader=self.load,
            overrides=self.overrides,
        )

    def _add_list(self, key: str, value: str) -> None:
        self.lists.setdefault(key, []).append(value)

    def postOptions(self) -> None:
        parent = getattr(self, "parent", None)
        if parent is not None:
            # Under systemd, journald stamps each line: twistd should not.
            prefer_journal(parent, os.environ)
        for option, key in self.keyOptions.items():
            if self.get(option) is not None:
                self.overrides.setdefault(self.section, {})[key] = str(self[option])
        for key, values in self.lists.items():
            self.overrides.setdefault(self.section, {})[key] = " ".join(values)
        if self.section:
            # Running a single daemon means running it, whatever the file says.
            self.overrides.setdefault(self.section, {}).setdefault("enabled", "true")
        try:
            self.config = self.load()
        except ConfigError as e:
            # Not a usage error: say what is wrong without the options list.
            raise SystemExit(f"sockd: {e}") from None
