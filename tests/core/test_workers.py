"""Tests of C{[sockd] workers}: supervision in memory, adoption of sockets."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IFileDescriptor, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import sockd.core.config as config
import sockd.core.metrics as metrics
import sockd.core.workers as workers
from sockd import tap
from sockd.core.config import ConfigError
from sockd.core.service import (
    Listener,
    datagram_listener,
    make_daemon_service,
    shared_sockets,
    stream_listener,
)
from sockd.daemons import DAEMONS
from sockd.echo.protocol import EchoFactory
from tests.helpers import settings, tempdir


@implementer(IProcessTransport)
class FakeProcess:
    """What spawnProcess returns: records the signals it is sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.gone = False

    def signalProcess(self, name: str) -> None:
        if self.gone:
            from twisted.internet.error import ProcessExitedAlready

            raise ProcessExitedAlready()
        self.signals.append(name)


class ProcessReactor(Clock):
    """A clock that records spawned processes and runs start-up calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.next_pid = 1000

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)

    def spawnProcess(
        self,
        protocol: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str],
        childFDs: dict[int, Any],
    ) -> FakeProcess:
        self.next_pid += 1
        process = FakeProcess(self.next_pid)
        self.spawned.append(
            {
                "protocol": protocol,
                "args": args,
                "env": env,
                "fds": childFDs,
                "process": process,
            }
        )
        protocol.makeConnection(process)  # type: ignore[arg-type]
        return process


@implementer(IFileDescriptor)
class FakePort:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 9001)


def end(spawned: dict[str, Any], code: int | None = 0, signal: int = 0) -> None:
    spawned["process"].gone = True
    if code == 0:
        reason = Failure(ProcessDone(0))
    else:
        reason = Failure(ProcessTerminated(code, signal or None))
    spawned["protocol"].processEnded(reason)


def listener(
    service: str, description: str, fd: int, reuse_port: bool = False
) -> Listener:
    rebind = (lambda host, port: None) if reuse_port else None
    child = Listener(service, description, lambda: None, rebind=rebind)  # type: ignore[arg-type,return-value]
    child.port = FakePort(fd)  # type: ignore[assignment]
    return child


class WorkersConfigTests(SynchronousTestCase):
    def test_default_is_one_process(self) -> None:
        self.assertEqual(settings().sockd.workers, 1)

    def test_number_and_auto(self) -> None:
        self.assertEqual(settings("[sockd]\nworkers = 4\n").sockd.workers, 4)
        auto = settings("[sockd]\nworkers = auto\n").sockd.workers
        self.assertEqual(auto, len(os.sched_getaffinity(0)))

    def test_bad_values_say_what_is_allowed(self) -> None:
        for bad in ("0", "-1", "two", "257"):
            with self.assertRaises(ConfigError) as caught:
                settings(f"[sockd]\nworkers = {bad}\n")
            message = str(caught.exception)
            self.assertIn("[sockd] workers", message)
            self.assertIn("expected auto or a whole number from 1 to 256", message)


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.top = make_tree()
        self.workers = workers.Workers(
            2,
            {
                "config": "/etc/sockd/sockd.ini",
                "overrides": {"echo": {"mode": "raw"}},
                "sections": ["echo", "file"],
                "metrics": True,
            },
            self.reactor,
            grace=10,
            sockets=lambda: shared_sockets(self.top, ["echo", "file"]),
            executable="/usr/bin/python3",
        )
        self.workers.setServiceParent(self.top)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_spawns_workers_sharing_echo_and_file_sockets(self) -> None:
        os.environ["NOTIFY_SOCKET"] = "/run/systemd/notify"
        self.addCleanup(os.environ.pop, "NOTIFY_SOCKET", None)
        self.top.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        first = self.reactor.spawned[0]
        self.assertEqual(first["args"], ["/usr/bin/python3", "-m", "sockd.worker"])
        # Chat (fd 12) and metrics (fd 13) stay in the main process; the UDP
        # port is bound again beside ours, not inherited.
        self.assertEqual(first["fds"], {0: "w", 1: "r", 2: "r", 3: 10, 4: 14})
        spec = json.loads(first["env"][workers.SPEC_VARIABLE])
        self.assertEqual(spec["index"], 1)
        self.assertEqual(spec["config"], "/etc/sockd/sockd.ini")
        self.assertEqual(spec["overrides"], {"echo": {"mode": "raw"}})
        self.assertEqual(
            spec["listeners"],
            [
                {"section": "echo", "description": "tcp:9000", "fd": 3},
                {
                    "section": "echo",
                    "description": "udp:9001",
                    "address": ["127.0.0.1", 9001],
                },
                {"section": "file", "description": "tcp:8898", "fd": 4},
            ],
        )
        # systemd's notification socket speaks for the main process only.
        self.assertNotIn("NOTIFY_SOCKET", first["env"])
        second = json.loads(self.reactor.spawned[1]["env"][workers.SPEC_VARIABLE])
        self.assertEqual(second["index"], 2)
        self.assertIn("sockd: started worker 2 of 2 (pid 1002)", self.logged())

    def test_dead_worker_restarts_with_growing_delay(self) -> None:
        self.top.startService()
        end(self.reactor.spawned[0], 1)
        self.assertIn(
            "sockd: worker 1 (pid 1001) exited with status 1; restarting it in 0.5s",
            self.logged(),
        )
        self.reactor.advance(0.49)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), 3)
        again = self.reactor.spawned[2]
        self.assertEqual(json.loads(again["env"][workers.SPEC_VARIABLE])["index"], 1)
        end(again, None, 9)
        self.assertIn(
            "sockd: worker 1 (pid 1003) was killed by SIGKILL; restarting it in 1.0s",
            self.logged(),
        )
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertEqual(self.workers.restarts, 2)

    def test_a_worker_that_cannot_start_is_tried_again(self) -> None:
        spawn = self.reactor.spawnProcess
        failures = [OSError(11, "Resource temporarily unavailable")]

        def refusing(*args: Any, **kwargs: Any) -> FakeProcess:
            if failures:
                raise failures.pop()
            return spawn(*args, **kwargs)

        self.reactor.spawnProcess = refusing  # type: ignore[method-assign]
        self.top.startService()
        self.assertIn(
            "sockd: worker 1 could not start: [Errno 11] Resource temporarily "
            "unavailable; restarting it in 0.5s",
            self.logged(),
        )
        self.assertEqual(sorted(self.workers.alive), [2])
        self.reactor.advance(0.5)
        self.assertEqual(sorted(self.workers.alive), [1, 2])

    def test_backoff_resets_after_steady_service(self) -> None:
        self.top.startService()
        end(self.reactor.spawned[0], 1)
        self.reactor.advance(0.5)
        steady = self.reactor.spawned[2]
        steady["protocol"].outReceived(b'{"ready": "echo TCP 127.0.0.1:9000"}\n')
        self.reactor.advance(workers.STEADY)
        end(steady, 1)
        self.assertIn("restarting it in 0.5s", self.logged()[-1])

    def test_stop_terminates_then_kills(self) -> None:
        self.top.startService()
        stopped = self.workers.stopService()
        assert isinstance(stopped, Deferred)
        for spawned in self.reactor.spawned:
            self.assertEqual(spawned["process"].signals, ["TERM"])
        end(self.reactor.spawned[0])
        self.assertNoResult(stopped)
        self.reactor.advance(10)
        self.assertEqual(self.reactor.spawned[1]["process"].signals, ["TERM", "KILL"])
        end(self.reactor.spawned[1], None, 9)
        self.successResultOf(stopped)
        # Stopping is not a failure: nothing is restarted.
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_cancels_a_pending_restart(self) -> None:
        self.top.startService()
        end(self.reactor.spawned[0], 1)
        end(self.reactor.spawned[1], 1)
        self.successResultOf(self.workers.stopService())  # type: ignore[arg-type]
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_reload_is_passed_on(self) -> None:
        self.top.startService()
        self.workers.reconfigure(settings("[sockd]\nworkers = 3\n"))
        for spawned in self.reactor.spawned:
            self.assertEqual(spawned["process"].signals, ["HUP"])
        self.workers.reconfigure(settings("[sockd]\nworkers = 5\n"))
        self.assertIn(
            "sockd: [sockd] workers changed; it applies at the next restart",
            self.logged(),
        )

    def test_worker_log_events_keep_level_and_fields(self) -> None:
        self.top.startService()
        event = _worker_event(
            "{service}: closing {peer}: idle timeout", service="echo", peer="1.2.3.4"
        )
        protocol = self.reactor.spawned[0]["protocol"]
        # Split anywhere: lines are put back together.
        line = json.dumps({"log": event}).encode() + b"\n"
        protocol.outReceived(line[:7])
        protocol.outReceived(line[7:])
        relayed = [e for e in self.events if e.get("sockd_worker") == 1]
        self.assertEqual(len(relayed), 1)
        self.assertEqual(
            formatEvent(relayed[0]), "worker 1: echo: closing 1.2.3.4: idle timeout"
        )
        self.assertEqual(relayed[0]["peer"], "1.2.3.4")
        self.assertEqual(relayed[0]["log_level"].name, "warn")

    def test_stderr_and_garbage_are_logged_as_text(self) -> None:
        self.top.startService()
        protocol = self.reactor.spawned[0]["protocol"]
        protocol.errReceived(b"Traceback (most recent call last):\n")
        protocol.outReceived(b"not json\n")
        protocol.outReceived(b"x" * (workers.MAX_LINE + 1))
        protocol.outReceived(b"still the long line\n")
        protocol.outReceived(b'{"metrics": [["x", "counter"]]}\n')
        protocol.outReceived(b'{"log": "[1, 2]"}\n')
        protocol.outReceived(b'{"ready": "echo"}\n')
        logged = self.logged()
        self.assertIn('worker 1: {"metrics": [["x", "counter"]]}', logged)
        self.assertIn("worker 1: [1, 2]", logged)
        self.assertIn("worker 1: Traceback (most recent call last):", logged)
        self.assertIn("worker 1: not json", logged)
        self.assertFalse([line for line in logged if "still the long line" in line])
        self.assertIn("sockd: worker 1 (pid 1001) serving echo", logged)

    def test_metrics_add_up_across_processes(self) -> None:
        self.top.startService()
        for spawned, count in zip(self.reactor.spawned, (3, 4), strict=True):
            sample = [
                "connections_accepted_total",
                "counter",
                {"service": "echo"},
                count,
            ]
            spawned["protocol"].outReceived(
                json.dumps({"metrics": [sample]}).encode() + b"\n"
            )
        own = EchoFactory(settings().echo, Clock())
        own.accepted = 5
        collector = metrics.SockdCollector(lambda: [own, self.workers])
        text = _exposition(collector)
        self.assertIn('sockd_connections_accepted_total{service="echo"} 12.0', text)
        self.assertIn("sockd_workers 2.0", text)
        # A worker gone takes its counters with it.
        end(self.reactor.spawned[0], 1)
        text = _exposition(collector)
        self.assertIn('sockd_connections_accepted_total{service="echo"} 9.0', text)
        self.assertIn("sockd_worker_restarts_total 1.0", text)


def _worker_event(format: str, **fields: Any) -> str:
    from twisted.logger import LogLevel, eventAsJSON

    captured: list[dict[str, Any]] = []
    Logger(namespace="sockd", observer=captured.append).emit(
        LogLevel.warn, format, **fields
    )
    return eventAsJSON(captured[0])


def _exposition(collector: metrics.SockdCollector) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry_for(collector)).decode()


def daemons(*sections: str) -> dict[str, Any]:
    """The builders of C{sections}, as the daemons pass them."""
    return {section: DAEMONS[section] for section in sections}


def make_tree() -> Any:
    from twisted.application.service import MultiService

    top = MultiService()
    for child in (
        listener("echo", "tcp:9000", 10),
        listener("echo", "udp:9001", 11, reuse_port=True),
        listener("chat", "udp:8001", 12),
        listener("metrics", "tcp:9102", 13),
        listener("file", "tcp:8898", 14),
    ):
        child.setServiceParent(top)
    return top


class ChannelTests(SynchronousTestCase):
    def test_messages_are_json_lines_and_dropped_while_paused(self) -> None:
        orphaned: list[bool] = []
        channel = workers.Channel(lambda: orphaned.append(True))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.assertIs(transport.producer, channel)
        channel.send({"ready": "echo"})
        self.assertEqual(transport.value(), b'{"ready": "echo"}\n')
        channel.pauseProducing()
        channel.send({"metrics": []})
        self.assertEqual(channel.dropped, 1)
        channel.resumeProducing()
        channel.send({"metrics": []})
        self.assertEqual(transport.value().count(b"\n"), 2)
        channel.connectionLost(None)
        self.assertEqual(orphaned, [True])

    def test_twisted_chatter_stays_home(self) -> None:
        channel = workers.Channel(lambda: None)
        transport = StringTransport()
        channel.makeConnection(transport)
        from twisted.logger import LogLevel

        channel.log_event(
            {"log_level": LogLevel.info, "log_namespace": "log_legacy", "x": 1}
        )
        channel.log_event({"log_level": LogLevel.debug, "log_namespace": "sockd"})
        self.assertEqual(transport.value(), b"")
        channel.log_event(
            {"log_level": LogLevel.error, "log_namespace": "log_legacy", "x": 1}
        )
        channel.log_event({"log_level": LogLevel.info, "log_namespace": "sockd"})
        self.assertEqual(transport.value().count(b"\n"), 2)


class EntryPointTests(SynchronousTestCase):
    def test_started_by_hand_says_how_workers_start(self) -> None:
        from sockd import worker

        self.patch(os, "environ", {})
        with self.assertRaises(SystemExit) as caught:
            worker.main()
        self.assertIn("no SOCKD_WORKER in the environment", str(caught.exception))
        self.assertIn("[sockd] workers", str(caught.exception))


class AdoptionTests(SynchronousTestCase):
    def test_inherited_socket_is_adopted_and_its_descriptor_closed(self) -> None:
        reactor = MemoryReactorClock()
        factory = EchoFactory(settings().echo, reactor)
        child = stream_listener(
            "echo", "tcp:0:interface=127.0.0.1", factory, reactor, 5
        )
        with socket.socket(socket.AF_INET6) as bound:
            fd = os.dup(bound.fileno())
            child.inherit(fd)
            child.startService()
            ((adopted_fd, family, served),) = reactor.adoptedPorts
        self.assertEqual((adopted_fd, family, served), (fd, socket.AF_INET6, factory))
        self.assertEqual(reactor.tcpServers, [])
        with self.assertRaises(OSError):
            os.fstat(fd)

    def test_tls_listener_adopts_with_tls(self) -> None:
        from sockd.client import cert as certificates

        directory = tempdir(self)
        pem, private = certificates.make_certificate("localhost")
        (directory / "cert.pem").write_bytes(pem)
        (directory / "key.pem").write_bytes(private)
        key, cert = directory / "key.pem", directory / "cert.pem"
        reactor = MemoryReactorClock()
        factory = EchoFactory(settings().echo, reactor)
        child = stream_listener(
            "echo", f"ssl:0:privateKey={key}:certKey={cert}", factory, reactor, 5
        )
        with socket.socket() as bound:
            child.inherit(os.dup(bound.fileno()))
            child.startService()
        ((_, _, served),) = reactor.adoptedPorts
        self.assertIsInstance(served, TLSMemoryBIOFactory)
        self.assertIs(served.wrappedFactory, factory)


class DupReactor(MemoryReactorClock):
    """Adopts datagram sockets as the real reactor does: a duplicate."""

    def adoptDatagramPort(self, fd: int, family: Any, *args: Any) -> Any:
        kept = socket.socket(family, socket.SOCK_DGRAM, fileno=os.dup(fd))
        self.kept.append(kept)

        class Port:
            def getHost(self) -> IPv4Address:
                return IPv4Address("UDP", *kept.getsockname())

        return Port()

    kept: list[socket.socket]


class ReusePortTests(SynchronousTestCase):
    def test_workers_bind_udp_beside_the_main_process(self) -> None:
        from sockd.echo.protocol import DatagramEcho

        reactor = DupReactor()
        reactor.kept = []
        self.addCleanup(lambda: [s.close() for s in reactor.kept])
        conf = settings(
            "[sockd]\nworkers = 2\n",
            echo={"listen": "", "listen_udp": "udp:0:interface=127.0.0.1"},
        )
        protocol = DatagramEcho(conf.echo, reactor)  # type: ignore[arg-type]
        main = datagram_listener(
            "echo", "udp:0:interface=127.0.0.1", protocol, reactor, 100, True
        )
        main.startService()
        host, port = reactor.kept[0].getsockname()
        # Without SO_REUSEPORT a second socket could not bind there.
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain,
            self.assertRaises(OSError),
        ):
            plain.bind((host, port))
        worker = datagram_listener(
            "echo", "udp:0:interface=127.0.0.1", protocol, reactor, 100, True
        )
        worker.rebind(host, port)
        worker.startService()
        self.assertEqual(reactor.kept[1].getsockname(), (host, port))

    def test_systemd_sockets_are_inherited_not_rebound(self) -> None:
        reactor = MemoryReactorClock()
        child = datagram_listener(
            "echo",
            "systemd:domain=INET:index=1",
            object(),
            reactor,
            100,
            True,  # type: ignore[arg-type]
        )
        self.assertIsNone(child._rebind)


class TreeTests(SynchronousTestCase):
    def test_workers_beside_listeners_chat_stays_home(self) -> None:
        conf = settings(
            "[sockd]\nworkers = 3\n[chat]\nenabled = true\nlisten = udp:0\n"
        )
        top = make_daemon_service(
            conf,
            daemons("echo", "chat"),
            MemoryReactorClock(),
            overrides={"x": {"y": "z"}},
        )
        supervisor = top.getServiceNamed("workers")
        assert isinstance(supervisor, workers.Workers)
        self.assertEqual(supervisor.count, 2)
        self.assertEqual(supervisor.spec["sections"], ["echo"])
        self.assertEqual(supervisor.spec["overrides"], {"x": {"y": "z"}})
        self.assertTrue(os.path.isabs(supervisor.spec["config"]))

    def test_chat_alone_starts_no_worker(self) -> None:
        conf = settings("[sockd]\nworkers = 3\n[chat]\nenabled = true\n")
        top = make_daemon_service(conf, daemons("chat"), MemoryReactorClock())
        self.assertNotIn("workers", [s.name for s in top])

    def test_one_process_by_default(self) -> None:
        top = make_daemon_service(settings(), daemons("echo"), MemoryReactorClock())
        self.assertNotIn("workers", [s.name for s in top])

    def test_worker_tree_serves_inherited_sockets_only(self) -> None:
        conf = settings(
            "[sockd]\nworkers = 2\n[metrics]\nenabled = true\n",
            echo={"listen": "tcp:0:interface=127.0.0.1", "listen_udp": ""},
        )
        reactor = MemoryReactorClock()
        with socket.socket() as bound:
            fd = os.dup(bound.fileno())
            top = make_daemon_service(
                conf,
                daemons("echo"),
                reactor,
                inherited={("echo", "tcp:0:interface=127.0.0.1"): fd},
            )
            names = [s.name for s in top]
            top.startService()
        self.assertEqual(names, ["echo tcp:0:interface=127.0.0.1", "lifecycle"])
        self.assertEqual(len(reactor.adoptedPorts), 1)
        self.assertEqual(reactor.tcpServers, [])

    def test_worker_skips_a_listener_the_main_process_lacks(self) -> None:
        conf = settings(echo={"listen": "tcp:0", "listen_udp": ""})
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        top = make_daemon_service(
            conf, daemons("echo"), MemoryReactorClock(), inherited={}
        )
        self.assertEqual([s.name for s in top], ["lifecycle"])
        self.assertIn(
            "sockd: echo tcp:0 is not in the main process's listeners (the file "
            "changed?); not served here until a restart",
            [formatEvent(e) for e in events],
        )

    def test_options_overrides_reach_the_workers(self) -> None:
        options = tap.Options()
        options.parseOptions(["--set", "sockd.workers=2", "--set", "echo.mode=raw"])
        top = tap.makeService(options, MemoryReactorClock())
        supervisor = top.getServiceNamed("workers")
        assert isinstance(supervisor, workers.Workers)
        self.assertEqual(supervisor.spec["overrides"]["echo"]["mode"], "raw")
        # The worker loads exactly the file the main process loaded.
        loaded = config.load(supervisor.spec["config"], supervisor.spec["overrides"])
        self.assertEqual(loaded.echo.mode, "raw")
        self.assertEqual(loaded.sockd.workers, 2)
