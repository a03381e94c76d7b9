"""sd_notify client, the Ready service that uses it, and the journal logger."""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile

from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import sockd.echo.tap as echo_tap
from sockd.core.logs import journal_observer, json_observer, prefer_journal
from sockd.core.notify import Notifier, notify_address, watchdog_interval
from sockd.core.service import Ready, make_daemon_service
from tests.helpers import settings


class Receiver:
    """A NOTIFY_SOCKET: an AF_UNIX datagram socket in a private directory."""

    def __init__(self, test: SynchronousTestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.sock.close)
        if abstract:
            name = f"sockd-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="sockd-notify-")
            self.env_value = os.path.join(directory, "notify")
            self.sock.bind(self.env_value)
            test.addCleanup(os.rmdir, directory)
            test.addCleanup(os.unlink, self.env_value)
        self.sock.settimeout(2)

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096)
        assert data.endswith(b"\n"), data
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(2)
        return True


class AddressTests(SynchronousTestCase):
    def test_path(self) -> None:
        self.assertEqual(notify_address("/run/systemd/notify"), "/run/systemd/notify")

    def test_abstract(self) -> None:
        self.assertEqual(notify_address("@sd-notify"), b"\0sd-notify")

    def test_unsupported(self) -> None:
        for value in ("", "@", "relative/path", "vsock:2:1234"):
            self.assertIsNone(notify_address(value), value)


class WatchdogIntervalTests(SynchronousTestCase):
    def test_half_of_usec(self) -> None:
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7), 15.0)

    def test_for_this_pid(self) -> None:
        env = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "7"}
        self.assertEqual(watchdog_interval(env, 7), 2.0)

    def test_for_another_pid(self) -> None:
        env = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "8"}
        self.assertIsNone(watchdog_interval(env, 7))

    def test_absent_zero_or_garbage(self) -> None:
        for value in ("", "0", "-5", "ten", "1e6"):
            self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": value}, 7), value)


class NotifierTests(SynchronousTestCase):
    def test_disabled_without_socket(self) -> None:
        notifier = Notifier({}, Clock())
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.ready("x"))
        self.assertFalse(notifier.start_watchdog())

    def test_ready_with_status(self) -> None:
        receiver = Receiver(self)
        notifier = Notifier({"NOTIFY_SOCKET": receiver.env_value}, Clock())
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.ready("echo: TCP 127.0.0.1:9000"))
        self.assertEqual(
            receiver.receive(), {"READY": "1", "STATUS": "echo: TCP 127.0.0.1:9000"}
        )

    def test_abstract_namespace(self) -> None:
        receiver = Receiver(self, abstract=True)
        notifier = Notifier({"NOTIFY_SOCKET": receiver.env_value}, Clock())
        self.addCleanup(notifier.close)
        notifier.stopping()
        self.assertEqual(receiver.receive()["STOPPING"], "1")

    def test_status_is_one_clean_line(self) -> None:
        receiver = Receiver(self)
        notifier = Notifier({"NOTIFY_SOCKET": receiver.env_value}, Clock())
        self.addCleanup(notifier.close)
        notifier.status("a\nREADY=1\x1b[2J" + "x" * 500)
        message = receiver.receive()
        self.assertEqual(list(message), ["STATUS"])
        self.assertTrue(message["STATUS"].startswith("a\\nREADY=1\\x1b[2J"))
        self.assertLess(len(message["STATUS"]), 260)

    def test_watchdog_pings_at_half_interval(self) -> None:
        receiver = Receiver(self)
        clock = Clock()
        env = {
            "NOTIFY_SOCKET": receiver.env_value,
            "WATCHDOG_USEC": "10000000",
            "WATCHDOG_PID": "1234",
        }
        notifier = Notifier(env, clock, pid=1234)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.start_watchdog())
        self.assertEqual(receiver.receive(), {"WATCHDOG": "1"})
        clock.advance(4.9)
        self.assertFalse(receiver.pending())
        clock.advance(0.1)
        self.assertEqual(receiver.receive(), {"WATCHDOG": "1"})
        clock.advance(5)
        self.assertEqual(receiver.receive(), {"WATCHDOG": "1"})
        notifier.stop_watchdog()
        clock.advance(60)
        self.assertFalse(receiver.pending())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_watchdog_for_other_pid_is_ignored(self) -> None:
        receiver = Receiver(self)
        env = {
            "NOTIFY_SOCKET": receiver.env_value,
            "WATCHDOG_USEC": "10000000",
            "WATCHDOG_PID": "99",
        }
        notifier = Notifier(env, Clock(), pid=1234)
        self.assertFalse(notifier.start_watchdog())

    def test_send_failure_is_logged_once_and_not_fatal(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        missing = os.path.join(tempfile.mkdtemp(prefix="sockd-notify-"), "gone")
        notifier = Notifier({"NOTIFY_SOCKET": missing}, Clock())
        self.addCleanup(notifier.close)
        self.assertFalse(notifier.ready("x"))
        self.assertFalse(notifier.stopping())
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("cannot notify", warnings[0]["log_format"])

    def test_unsupported_address_warns(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:99"}, Clock())
        self.assertFalse(notifier.enabled)
        self.assertEqual(len(events), 1)


class ReadyServiceTests(SynchronousTestCase):
    def service(
        self, env: dict[str, str]
    ) -> tuple[MultiService, MemoryReactorClock, Ready]:
        reactor = MemoryReactorClock()
        config = settings(
            echo={
                "listen": "tcp:7007:interface=127.0.0.1",
                "listen_udp": "",
            }
        )
        top = make_daemon_service(config, {"echo": echo_tap.build}, reactor)
        ready = top.getServiceNamed("ready")
        assert isinstance(ready, Ready)
        ready.environ = env
        return top, reactor, ready

    def test_ready_after_bind_then_stopping(self) -> None:
        receiver = Receiver(self)
        top, reactor, ready = self.service({"NOTIFY_SOCKET": receiver.env_value})
        self.assertFalse(receiver.pending())
        top.privilegedStartService()
        # Bound, but not yet started: not ready.
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertFalse(receiver.pending())
        top.startService()
        # twistd runs the reactor (and sets its SIGTERM handler) only then.
        self.assertFalse(receiver.pending())
        reactor.run()
        message = receiver.receive()
        self.assertEqual(message["READY"], "1")
        self.assertIn("echo: TCP ", message["STATUS"])
        top.stopService()
        self.assertEqual(receiver.receive()["STOPPING"], "1")

    def test_watchdog_started_and_stopped(self) -> None:
        receiver = Receiver(self)
        env = {"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "2000000"}
        top, reactor, ready = self.service(env)
        top.privilegedStartService()
        top.startService()
        reactor.run()
        self.assertEqual(receiver.receive()["READY"], "1")
        self.assertEqual(receiver.receive(), {"WATCHDOG": "1"})
        reactor.advance(1)
        self.assertEqual(receiver.receive(), {"WATCHDOG": "1"})
        top.stopService()
        self.assertEqual(receiver.receive()["STOPPING"], "1")
        reactor.advance(10)
        self.assertFalse(receiver.pending())

    def test_stopped_before_the_reactor_ran_says_nothing(self) -> None:
        receiver = Receiver(self)
        top, reactor, ready = self.service({"NOTIFY_SOCKET": receiver.env_value})
        top.privilegedStartService()
        top.startService()
        top.stopService()
        reactor.run()
        self.assertFalse(receiver.pending())

    def test_without_notify_socket_only_logs(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        top, reactor, ready = self.service({})
        top.privilegedStartService()
        top.startService()
        reactor.run()
        self.assertIn("sockd: ready: {services}", [e.get("log_format") for e in events])
        assert ready.notifier is not None
        self.assertFalse(ready.notifier.enabled)
        top.stopService()


class JournalObserverTests(SynchronousTestCase):
    def event(self, level: LogLevel = LogLevel.info, **extra: object) -> dict:
        return {
            "log_format": "echo: listening on {where}",
            "where": "TCP 127.0.0.1:7",
            "log_level": level,
            "log_namespace": "sockd",
            "log_time": 1700000000.0,
            **extra,
        }

    def test_no_timestamp_outside_journal(self) -> None:
        out = io.StringIO()
        journal_observer(out, {})(self.event())
        self.assertEqual(
            out.getvalue(), "[sockd#info] echo: listening on TCP 127.0.0.1:7\n"
        )

    def test_priority_prefix_when_stdout_is_the_journal(self) -> None:
        with tempfile.TemporaryFile("w+") as out:
            stat = os.fstat(out.fileno())
            env = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
            observer = journal_observer(out, env)
            observer(self.event())
            observer(self.event(LogLevel.error, log_format="bad\nsecond line"))
            out.seek(0)
            self.assertEqual(
                out.read().splitlines(),
                [
                    "<6>[sockd#info] echo: listening on TCP 127.0.0.1:7",
                    "<3>[sockd#error] bad",
                    "<3>second line",
                ],
            )

    def test_other_journal_stream_means_no_prefix(self) -> None:
        out = io.StringIO()
        journal_observer(out, {"JOURNAL_STREAM": "1:2"})(self.event(LogLevel.warn))
        self.assertTrue(out.getvalue().startswith("[sockd#warn] "))


class PreferJournalTests(SynchronousTestCase):
    def test_under_systemd_in_the_foreground(self) -> None:
        for env in ({"INVOCATION_ID": "0123abcd"}, {"JOURNAL_STREAM": "8:1234"}):
            options = {"nodaemon": 1, "logfile": None, "logger": None}
            self.assertTrue(prefer_journal(options, env))
            self.assertEqual(options["logger"], "sockd.logs.journal_observer")

    def test_left_alone(self) -> None:
        env = {"INVOCATION_ID": "0123abcd"}
        cases = [
            ({"nodaemon": 1, "logfile": None, "logger": None}, {}),
            ({"nodaemon": 0, "logfile": None, "logger": None}, env),
            ({"nodaemon": 1, "logfile": "/var/log/x", "logger": None}, env),
            ({"nodaemon": 1, "logfile": None, "logger": json_observer}, env),
        ]
        for options, environ in cases:
            before = dict(options)
            self.assertFalse(prefer_journal(options, environ))
            self.assertEqual(options, before)

    def test_through_twistd_options(self) -> None:
        from twisted.scripts.twistd import ServerOptions

        self.patch(os, "environ", {**os.environ, "INVOCATION_ID": "0123abcd"})
        directory = tempfile.mkdtemp(prefix="sockd-logs-")
        self.addCleanup(shutil.rmtree, directory)
        ini = os.path.join(directory, "sockd.ini")
        with open(ini, "w") as f:
            f.write("[echo]\nlisten = tcp:0:interface=127.0.0.1\nlisten_udp =\n")
        options = ServerOptions()
        options.parseOptions(["--nodaemon", "sockd-echo", "--config", ini])
        self.assertIs(options["logger"], journal_observer)
        daemonized = ServerOptions()
        daemonized.parseOptions(["sockd-echo", "--config", ini])
        self.assertIsNone(daemonized["logger"])
