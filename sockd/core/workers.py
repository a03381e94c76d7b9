"""
More processes on the same sockets: C{[sockd] workers = N}.

One Twisted process uses one core.  With C{workers = N} the main process
binds every listener as usual (or adopts what systemd passed), serves like a
single-process daemon, and starts N-1 workers, C{python -m sockd.worker},
each inheriting the echo and file listening sockets and adopting them: the
kernel hands each new connection (or datagram) to whichever process accepts
it first.  UDP ports are the exception: the main process binds them with
C{SO_REUSEPORT} and each worker binds a socket of its own beside it, since
one datagram socket read by several processes wakes them all for every
datagram; the kernel gives each client address to one of the sockets.
(A UDP socket passed by systemd is shared as it is.)  Chat and the metrics
page stay in the main process (a chat room's members live in one process's
memory).

The main process supervises (L{Workers}):

 - a worker's standard output carries JSON lines: its log events (logged
   here, prefixed C{worker N:}), its readiness, and, when metrics are on, a
   snapshot of its counters every second, which the metrics page adds up;
 - a worker that dies is restarted, after a delay that doubles with each
   failure in a row (0.5 s up to 30 s);
 - SIGHUP is passed on (each worker re-reads the same file), and stopping
   sends SIGTERM, then SIGKILL to a worker still there after the grace;
 - a worker whose standard input closes (the main process is gone, even
   killed) stops by itself, so no worker outlives the daemon holding its
   ports.

The worker's side is L{Channel} here and its entry point, L{sockd.worker},
which builds the services: this module names none.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IPushProducer,
)
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import (
    Logger,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

import sockd
from sockd.core.config import Config
from sockd.core.interfaces import (
    IDaemonReactor,
    IMetricsSource,
    IReconfigurable,
    Sample,
)

__all__ = [
    "ENTRY_POINT",
    "SPEC_VARIABLE",
    "Channel",
    "SharedSocket",
    "Workers",
    "pretend_systemd",
]

log = Logger(namespace="sockd")

#: the module a worker runs (C{python -m}): a daemon module, above the
#: services, that builds them; the core may name it, never import it
ENTRY_POINT = "sockd.worker"
#: the environment variable carrying a worker's instructions (JSON)
SPEC_VARIABLE = "SOCKD_WORKER"
#: sections whose listeners workers share; chat keeps its state in one place
SHAREABLE = ("echo", "file")
#: seconds between a worker's metrics snapshots
REPORT_INTERVAL = 1.0
#: a worker that served this long before dying starts a fresh backoff
STEADY = 10.0
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
#: the longest line read from a worker; longer ones are dropped
MAX_LINE = 1024 * 1024
#: variables a worker must not see: they speak for the main process
_PRIVATE_ENVIRONMENT = (
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
)


#: a listener the workers share: (section, description, what), what being
#: the descriptor they inherit, or the (host, port) they bind beside it
SharedSocket = tuple[str, str, int | tuple[str, int]]


def shareable(sections: Sequence[str]) -> list[str]:
    return [s for s in sections if s in SHAREABLE]


# --- the main process's side ------------------------------------------------


class Worker(ProcessProtocol):
    """One worker process, seen from the main process."""

    pid: int | None = None
    started = 0.0
    ready = False

    def __init__(self, supervisor: Workers, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.samples: list[Sample] = []
        self._out = _Lines(self._message)
        self._err = _Lines(self._stderr)

    def connectionMade(self) -> None:
        transport = IProcessTransport(self.transport)
        self.pid = transport.pid
        self.started = self.supervisor.reactor.seconds()

    def outReceived(self, data: bytes) -> None:
        self._out.feed(data)

    def errReceived(self, data: bytes) -> None:
        self._err.feed(data)

    def signal(self, name: str) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(ProcessExitedAlready, OSError):
            self.transport.signalProcess(name)

    def _message(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self._stderr(line)
            return
        if not isinstance(message, dict):
            self._stderr(line)
        elif "log" in message:
            self._relay(message["log"])
        elif "metrics" in message:
            try:
                self.samples = [
                    (
                        str(n),
                        str(k),
                        {str(a): str(b) for a, b in labels.items()},
                        float(v),
                    )
                    for n, k, labels, v in message["metrics"]
                ]
            except (TypeError, ValueError, AttributeError):
                self._stderr(line)  # not what a worker sends: say so, keep going
        elif "ready" in message:
            self.ready = True
            log.info(
                "sockd: worker {index} (pid {pid}) serving {where}",
                index=self.index,
                pid=self.pid,
                where=str(message["ready"]),
            )

    def _relay(self, text: str) -> None:
        try:
            event = eventFromJSON(text)
        except (TypeError, ValueError, AttributeError):
            event = None
        if not isinstance(event, dict):
            self._stderr(str(text).encode())
            return
        # To the same observers as our own events, with a prefix saying which
        # process spoke; the fields stay for structured logs.
        event["sockd_text"] = formatEvent(event)
        event.pop("log_flattened", None)
        event["sockd_worker"] = self.index
        event["log_format"] = "worker {sockd_worker}: {sockd_text}"
        globalLogPublisher(event)

    def _stderr(self, line: bytes) -> None:
        log.warn(
            "worker {index}: {line}",
            index=self.index,
            line=line.decode("utf-8", "replace").rstrip(),
        )

    def processEnded(self, reason: Failure) -> None:
        self._out.flush()
        self._err.flush()
        self.samples = []
        self.supervisor.ended(self, reason)


class _Lines:
    """Splits a byte stream into lines, dropping lines over L{MAX_LINE}."""

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self.deliver = deliver
        self.buffer = b""
        self.discarding = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if self.discarding:
                self.discarding = False
            elif line:
                self.deliver(line)
        if len(self.buffer) > MAX_LINE:
            self.buffer = b""
            self.discarding = True

    def flush(self) -> None:
        if self.buffer and not self.discarding:
            self.deliver(self.buffer)
        self.buffer = b""


@implementer(IReconfigurable, IMetricsSource)
class Workers(Service):
    """
    Starts, watches and stops the worker processes, and sums their counters
    for the metrics page (L{metrics}).  C{sockets} says, when a worker
    starts, which listening sockets it shares (L{SharedSocket}).
    """

    stopping = False

    def __init__(
        self,
        count: int,
        spec: Mapping[str, Any],
        reactor: IDaemonReactor,
        grace: float,
        sockets: Callable[[], Sequence[SharedSocket]],
        executable: str = sys.executable,
    ) -> None:
        #: worker processes to run beside this one
        self.count = count
        self.spec = dict(spec)
        self.reactor = reactor
        self.grace = grace
        self.sockets = sockets
        self.executable = executable
        self.alive: dict[int, Worker] = {}
        self.failures: dict[int, int] = {}
        self.restarts = 0
        self._pending: dict[int, IDelayedCall] = {}
        self._stopped: Deferred[None] | None = None
        self._kill: IDelayedCall | None = None
        self.setName("workers")

    def startService(self) -> None:
        super().startService()
        # Spawned once the reactor runs: it reaps children from then on.
        self.reactor.callWhenRunning(self._start_all)

    def _start_all(self) -> None:
        if not self.alive and not self.stopping:
            for index in range(1, self.count + 1):
                self.spawn(index)

    def spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if self.stopping:
            return
        shared = self.sockets()
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        listeners = []
        number = 3
        for section, description, what in shared:
            entry: dict[str, Any] = {"section": section, "description": description}
            if isinstance(what, int):
                child_fds[number] = what
                entry["fd"] = number
                number += 1
            else:
                entry["address"] = list(what)
            listeners.append(entry)
        spec = {
            **self.spec,
            "index": index,
            "listeners": listeners,
            "systemd": _systemd_record(),
        }
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENVIRONMENT}
        env[SPEC_VARIABLE] = json.dumps(spec)
        # The worker must import this very sockd, wherever it was found.
        home = os.path.dirname(os.path.dirname(os.path.abspath(sockd.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (home, env.get("PYTHONPATH", "")) if p
        )
        worker = Worker(self, index)
        self.alive[index] = worker
        try:
            self.reactor.spawnProcess(
                worker,
                self.executable,
                [self.executable, "-m", ENTRY_POINT],
                env=env,
                childFDs=child_fds,
            )
        except OSError as e:  # EAGAIN (process limit), ENOMEM, ...
            del self.alive[index]
            self._retry(index, f"could not start: {e}")
            return
        log.info(
            "sockd: started worker {index} of {count} (pid {pid})",
            index=index,
            count=self.count,
            pid=worker.pid,
        )

    def ended(self, worker: Worker, reason: Failure) -> None:
        if self.alive.get(worker.index) is worker:
            del self.alive[worker.index]
        how = _describe_exit(reason)
        if self.stopping:
            log.info(
                "sockd: worker {index} (pid {pid}) {how}",
                index=worker.index,
                pid=worker.pid,
                how=how,
            )
            if not self.alive and self._stopped is not None:
                self._all_stopped()
            return
        now = self.reactor.seconds()
        if worker.ready and now - worker.started >= STEADY:
            self.failures[worker.index] = 0
        self._retry(worker.index, f"(pid {worker.pid}) {how}")

    def _retry(self, index: int, what: str) -> None:
        failures = self.failures.get(index, 0)
        delay = min(MAX_DELAY, FIRST_DELAY * 2**failures)
        self.failures[index] = failures + 1
        self.restarts += 1
        log.error(
            "sockd: worker {index} {what}; restarting it in {delay}s",
            index=index,
            what=what,
            delay=delay,
        )
        self._pending[index] = self.reactor.callLater(delay, self.spawn, index)

    def reconfigure(self, config: Config) -> None:
        """The main process re-read its file: each worker re-reads it too."""
        if config.sockd.workers - 1 != self.count:
            log.warn("sockd: [sockd] workers changed; it applies at the next restart")
        for worker in self.alive.values():
            worker.signal("HUP")

    def metrics(self) -> list[Sample]:
        """How many workers run and restarted, and what they counted."""
        samples: list[Sample] = [
            ("workers", "gauge", {}, float(len(self.alive))),
            ("worker_restarts_total", "counter", {}, float(self.restarts)),
        ]
        for worker in self.alive.values():
            samples.extend(worker.samples)
        return samples

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        if not self.alive:
            return succeed(None)
        self._stopped = Deferred()
        for worker in self.alive.values():
            worker.signal("TERM")
        self._kill = self.reactor.callLater(self.grace, self._kill_all)
        return self._stopped

    def _kill_all(self) -> None:
        self._kill = None
        for worker in self.alive.values():
            log.warn(
                "sockd: worker {index} (pid {pid}) still running after "
                "{grace}s; killing it",
                index=worker.index,
                pid=worker.pid,
                grace=self.grace,
            )
            worker.signal("KILL")

    def _all_stopped(self) -> None:
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._kill = None
        done, self._stopped = self._stopped, None
        if done is not None:
            done.callback(None)


def _systemd_record() -> dict[str, Any] | None:
    """How many sockets systemd passed this process, and their names."""
    from sockd.core.endpoints import inherited_sockets

    record = inherited_sockets()
    count = len(record.inheritedDescriptors())
    if not count:
        return None
    return {"count": count, "names": list(record.inheritedNamedDescriptors())}


def _describe_exit(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited"
    if not isinstance(value, ProcessTerminated):
        return "exited with status ?"
    if value.signal:
        try:
            name = signal.Signals(value.signal).name
        except ValueError:
            name = str(value.signal)
        return f"was killed by {name}"
    return f"exited with status {value.exitCode}"


# --- the worker's side -------------------------------------------------------


@implementer(IPushProducer)
class Channel(Protocol):
    """
    The worker's standard input and output.  Output is JSON lines; input
    carries nothing, but its end means the main process is gone.  While the
    main process does not read (stopped in a debugger, say), log events and
    snapshots are dropped rather than buffered without bound.
    """

    paused = False
    dropped = 0

    def __init__(self, on_orphaned: Callable[[], object]) -> None:
        self.on_orphaned = on_orphaned

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    def send(self, message: Mapping[str, Any]) -> None:
        if self.transport is None or self.paused:
            self.dropped += 1
            return
        self.transport.write(json.dumps(message).encode() + b"\n")

    def log_event(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        # Twisted's own chatter (ports starting and stopping) is said once,
        # by the main process; its warnings and errors still count.
        if level >= LogLevel.warn or (
            level >= LogLevel.info and event.get("log_namespace") != "log_legacy"
        ):
            self.send({"log": eventAsJSON(event)})

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.transport = None
        self.on_orphaned()


def pretend_systemd(spec: Mapping[str, Any]) -> None:
    """
    In a worker, let C{systemd:} descriptions parse as in the main process,
    which passes the count and names of the sockets systemd gave it.
    """
    systemd = spec.get("systemd")
    if systemd:
        from twisted.python.systemd import ListenFDs

        from sockd.core.endpoints import use_inherited_sockets

        # systemd: descriptions must parse here as in the main process; the
        # sockets themselves come from spec["listeners"], so these numbers
        # are placeholders that no one may use.
        use_inherited_sockets(
            ListenFDs([-1] * int(systemd["count"]), tuple(systemd["names"]))
        )
