"""Tests of the twistd wiring: plugins, options, services."""

from __future__ import annotations

import resource
import subprocess
import textwrap
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import sockd.chat.tap as chat_tap
import sockd.echo.tap as echo_tap
import sockd.files.tap as file_tap
from sockd import tap
from sockd.core import config
from sockd.core.service import (
    DescriptorLimit,
    Listener,
    descriptor_budget,
    make_daemon_service,
    with_backlog,
)
from sockd.echo.protocol import DatagramEcho, EchoFactory
from tests.helpers import ROOT, TWISTD, settings, tempdir

TAPNAMES = {"sockd", "sockd-echo", "sockd-chat", "sockd-file"}


class UDPMemoryReactor(MemoryReactorClock):
    """MemoryReactor records TCP listens; this records UDP ones too."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[tuple[int, object, str, int]] = []

    def listenUDP(
        self,
        port: int,
        protocol: object,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> object:
        self.udp.append((port, protocol, interface, maxPacketSize))
        test = self

        class Port:
            def getHost(self) -> object:
                from twisted.internet.address import IPv4Address

                return IPv4Address("UDP", interface, port)

            def stopListening(self) -> None:
                test.udp.remove((port, protocol, interface, maxPacketSize))

        return Port()


def write_ini(case: SynchronousTestCase, text: str) -> str:
    path = tempdir(case) / "sockd.ini"
    path.write_text(textwrap.dedent(text))
    return str(path)


class PluginTests(SynchronousTestCase):
    def test_every_tapname_listed(self) -> None:
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        self.assertTrue(names >= TAPNAMES, names)

    def test_twistd_help_lists_plugins_quietly(self) -> None:
        # A plugin that fails to import just vanishes from this list, with a
        # traceback on stderr and exit status 0.
        result = subprocess.run(
            [*TWISTD, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        self.assertEqual(result.returncode, 0)
        for name in TAPNAMES:
            self.assertRegex(result.stdout, rf"(?m)^\s+{name}\s")
        self.assertEqual(result.stderr, "")

    def test_no_plugin_package_init_shipped(self) -> None:
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())


class EchoOptionsTests(SynchronousTestCase):
    def test_command_line_overrides_file(self) -> None:
        ini = write_ini(self, "[echo]\nmode = line\nenabled = false\n")
        options = echo_tap.Options()
        options.parseOptions(
            [
                "--config",
                ini,
                "--listen",
                "tcp:7007:interface=127.0.0.1",
                "-l",
                "tcp:7008:interface=127.0.0.1",
                "--mode",
                "raw",
                "--set",
                "idle_timeout=7",
            ]
        )
        echo = options.config.echo
        self.assertEqual(echo.mode, "raw")
        self.assertTrue(echo.enabled)
        self.assertEqual(echo.idle_timeout, 7)
        self.assertEqual(
            echo.listen,
            ("tcp:7007:interface=127.0.0.1", "tcp:7008:interface=127.0.0.1"),
        )

    def test_config_error_is_usage_error(self) -> None:
        ini = write_ini(self, "[echo]\nmax_line_length = huge\n")
        with self.assertRaises(SystemExit) as caught:
            echo_tap.Options().parseOptions(["--config", ini])
        self.assertIn("[echo] max_line_length = 'huge'", str(caught.exception.code))

    def test_bad_option_value(self) -> None:
        ini = write_ini(self, "")
        with self.assertRaises(SystemExit) as caught:
            echo_tap.Options().parseOptions(["--config", ini, "--mode", "loud"])
        self.assertIn("command line: [echo] mode = 'loud'", str(caught.exception.code))

    def test_bad_set(self) -> None:
        with self.assertRaises(usage.UsageError):
            echo_tap.Options().parseOptions(["--set", "novalue"])


CONFIG_HELP = (
    "INI file (default: $SOCKD_CONFIG, /etc/sockd/sockd.ini, then the packaged default)"
)
SET_HELP = "Override one setting: KEY=VALUE, or SECTION.KEY=VALUE."
#: each daemon's options: name -> (short, takes a value, help)
OPTIONS: dict[str, dict[str, tuple[str | None, bool, str]]] = {
    "sockd": {"config": ("c", True, CONFIG_HELP), "set": (None, True, SET_HELP)},
    "echo": {
        "config": ("c", True, CONFIG_HELP),
        "set": (None, True, SET_HELP),
        "listen": ("l", True, "TCP endpoint to listen on (repeatable), e.g. tcp:7007."),
        "listen-udp": (
            "u",
            True,
            "UDP endpoint to listen on (repeatable), e.g. udp:7007.",
        ),
        "mode": ("m", True, "line or raw (RFC 862)"),
        "transform": ("t", True, "upper or none"),
        "max-line-length": (None, True, "longest line accepted, in bytes"),
        "idle-timeout": (None, True, "seconds a silent connection stays open"),
    },
    "chat": {
        "config": ("c", True, CONFIG_HELP),
        "set": (None, True, SET_HELP),
        "listen": ("l", True, "UDP endpoint to listen on (repeatable), e.g. udp:8001."),
        "default-room": (None, True, "room new members join"),
        "idle-timeout": (None, True, "seconds a silent member stays"),
        "history": (None, True, "messages shown to a member joining a room"),
        "max-message": (None, True, "largest message, in bytes"),
        "max-members": (None, True, "members in total"),
        "max-rooms": (None, True, "rooms in total"),
        "rate": (None, True, "messages per second per member"),
        "burst": (None, True, "messages a member may send at once"),
        "validation": (None, True, "on or off: members prove they receive"),
    },
    "file": {
        "config": ("c", True, CONFIG_HELP),
        "set": (None, True, SET_HELP),
        "listen": ("l", True, "TCP endpoint to listen on (repeatable), e.g. tcp:8898."),
        "listen-http": (
            None,
            True,
            "TCP endpoint where every connection is HTTP (repeatable), e.g. tcp:8080.",
        ),
        "root": ("r", True, "directory served"),
        "symlinks": (
            None,
            True,
            "inside (follow those staying inside root) or refuse",
        ),
        "hardlinks": (None, True, "allow or refuse files with more than one link"),
        "bare-errors": (None, True, "bare requests that fail: close or line"),
        "max-upload": (None, True, "largest upload accepted, e.g. 100M"),
        "max-connections": (None, True, "connections in total"),
        "max-connections-per-ip": (None, True, "connections per client address"),
        "request-timeout": (None, True, "seconds a request line may take"),
        "idle-timeout": (None, True, "seconds a silent connection stays open"),
        "rate-limit": (None, True, "bytes per second per connection (0: no cap)"),
        "total-rate-limit": (None, True, "bytes per second in total (0: no cap)"),
        "writable": ("w", False, "accept uploads (PUT)"),
        "overwrite": (None, False, "let uploads replace existing files"),
        "hidden": (None, False, "serve names starting with a dot"),
    },
}
TAPS = {"sockd": tap, "echo": echo_tap, "chat": chat_tap, "file": file_tap}


def described(options: usage.Options) -> dict[str, tuple[str | None, bool, str]]:
    """An Options' own options as name -> (short, takes a value, help)."""
    shorts = {
        long: short for short, long in options.synonyms.items() if len(short) == 1
    }
    return {
        name.rstrip("="): (
            shorts.get(name.rstrip("=")),
            name.endswith("="),
            options.docs[name.rstrip("=")],
        )
        for name in options.longOpt
        if name not in ("help", "version")
    }


class SchemaOptionsTests(SynchronousTestCase):
    """Each daemon offers the keys of its section that have an option's help."""

    def test_each_daemon_keeps_its_options(self) -> None:
        for name, module in TAPS.items():
            with self.subTest(daemon=name):
                self.assertEqual(described(module.Options()), OPTIONS[name])

    def test_a_subclass_offers_them_once(self) -> None:
        class Options(echo_tap.Options):
            pass

        self.assertEqual(Options().longOpt, echo_tap.Options().longOpt)
        self.assertEqual(Options().getUsage(), echo_tap.Options().getUsage())

    def test_bad_value_gets_the_files_message(self) -> None:
        ini = write_ini(self, "")
        for section in ("echo", "chat", "file"):
            for key, spec in config.SCHEMA[section].items():
                if not spec.doc or spec.flag:
                    continue
                option = "--" + key.replace("_", "-")
                with self.subTest(option=option), self.assertRaises(SystemExit) as cli:
                    TAPS[section].Options().parseOptions(
                        ["--config", ini, option, "?bad?"]
                    )
                with self.assertRaises(config.ConfigError) as in_file:
                    config.parse(f"[{section}]\n{key} = ?bad?\n", "f.ini")
                message = str(in_file.exception).replace(
                    "f.ini, line 2:", "command line:"
                )
                self.assertIn("command line: [", message)
                self.assertEqual(cli.exception.code, f"sockd: {message}")

    def test_options_win_over_set_and_flags_only_turn_on(self) -> None:
        root = tempdir(self)
        ini = write_ini(
            self, f"[file]\nroot = {root}\nwritable = true\nupload_allow = ::1\n"
        )
        options = file_tap.Options()
        options.parseOptions(
            [
                "--config",
                ini,
                "--hidden",
                "--set",
                "hidden=false",
                "--max-upload",
                "1K",
                "--set",
                "max_upload=2K",
            ]
        )
        settings = options.config.file
        self.assertEqual(
            (settings.writable, settings.hidden, settings.overwrite),
            (True, True, False),
        )
        self.assertEqual(settings.max_upload, 1024)
        self.assertEqual(
            options.overrides["file"],
            {
                "hidden": "true",
                "max_upload": "1K",
                "enabled": "true",
            },
        )


class MakeServiceTests(SynchronousTestCase):
    def options(self, text: str) -> echo_tap.Options:
        options = echo_tap.Options()
        options.parseOptions(["--config", write_ini(self, text)])
        return options

    def test_listeners_bound_with_backlog(self) -> None:
        reactor = UDPMemoryReactor()
        options = self.options(
            """
            [echo]
            listen = tcp:7007:interface=127.0.0.1 tcp:7008:interface=127.0.0.1:backlog=5
            listen_udp = udp:7009:interface=127.0.0.1
            udp_max_datagram = 1000
            """
        )
        service = echo_tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        ports = [(p[0], p[2], p[3]) for p in reactor.tcpServers]
        self.assertEqual(ports, [(7007, 4096, "127.0.0.1"), (7008, 5, "127.0.0.1")])
        self.assertIsInstance(reactor.tcpServers[0][1], EchoFactory)
        (udp,) = reactor.udp
        self.assertEqual((udp[0], udp[2], udp[3]), (7009, "127.0.0.1", 1001))
        self.assertIsInstance(udp[1], DatagramEcho)
        # The UDP echo never answers its own port.
        self.assertIn(7009, udp[1].blocked_ports)
        service.stopService()
        self.assertEqual(reactor.udp, [])

    def test_bind_failure_is_a_clear_exit(self) -> None:
        def fail() -> None:
            raise OSError(98, "Address already in use")

        listener = Listener("echo", "tcp:7:interface=127.0.0.1", fail)
        with self.assertRaises(SystemExit) as caught:
            listener.privilegedStartService()
        self.assertEqual(
            str(caught.exception.code),
            "sockd: echo cannot listen on tcp:7:interface=127.0.0.1: "
            "[Errno 98] Address already in use",
        )

    def test_all_in_one_runs_enabled_sections(self) -> None:
        options = tap.Options()
        options.parseOptions(
            [
                "--config",
                write_ini(self, "[echo]\nlisten_udp =\n"),
                "--set",
                "echo.mode=raw",
            ]
        )
        self.assertEqual(options.enabled_sections(), ["echo"])
        self.assertEqual(options.config.echo.mode, "raw")
        reactor = UDPMemoryReactor()
        tap.makeService(options, reactor=reactor).privilegedStartService()
        self.assertEqual(len(reactor.tcpServers), 1)

    def test_all_in_one_with_nothing_enabled(self) -> None:
        ini = write_ini(
            self,
            "[echo]\nenabled = false\n[chat]\nenabled = false\n"
            "[file]\nenabled = false\n",
        )
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", ini])
        self.assertIn("no service is enabled", str(caught.exception))


class BacklogTests(SynchronousTestCase):
    def test_added_when_missing(self) -> None:
        self.assertEqual(with_backlog("tcp:1", 9), "tcp:1:backlog=9")
        self.assertEqual(with_backlog("tcp:1:backlog=3", 9), "tcp:1:backlog=3")
        self.assertEqual(
            with_backlog("systemd:domain=INET:index=0", 9),
            "systemd:domain=INET:index=0",
        )


class SetOptionTests(SynchronousTestCase):
    """--set names a known section and key, as the file must."""

    def test_unknown_section_stops_start_up(self) -> None:
        ini = write_ini(self, "[echo]\nlisten_udp =\n")
        for options in (tap.Options(), echo_tap.Options()):
            with self.assertRaises(SystemExit) as caught:
                options.parseOptions(["--config", ini, "--set", "bogus.key=1"])
            self.assertEqual(
                caught.exception.code,
                "sockd: command line: --set bogus.key: unknown section [bogus]; "
                "expected: [sockd], [echo], [chat], [file], [metrics]",
            )

    def test_unknown_key_of_the_daemons_section(self) -> None:
        ini = write_ini(self, "")
        with self.assertRaises(SystemExit) as caught:
            echo_tap.Options().parseOptions(["--config", ini, "--set", "bogus=1"])
        self.assertIn(
            "sockd: command line: [echo] unknown key 'bogus'; expected one of: "
            "enabled, listen,",
            str(caught.exception.code),
        )


@pytest.mark.integration
def test_unknown_set_section_exits_with_status_1(tmp_path: Path) -> None:
    ini = tmp_path / "sockd.ini"
    ini.write_text("[echo]\nlisten = tcp:0:interface=127.0.0.1\nlisten_udp =\n")
    command = ["-n", "--pidfile=", "sockd-echo", "--config", str(ini)]
    result = subprocess.run(
        [*TWISTD, *command, "--set", "bogus.key=1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "unknown section [bogus]" in result.stderr
    assert "listening on" not in result.stdout + result.stderr


class Limits:
    """getrlimit and setrlimit for RLIMIT_NOFILE, in memory."""

    def __init__(self, soft: int, hard: int, error: OSError | None = None) -> None:
        self.soft, self.hard, self.error = soft, hard, error
        self.set: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.error is not None:
            raise self.error
        self.set.append(limits)
        self.soft, self.hard = limits


#: echo and file with their default caps, as in the shipped file
ECHO_AND_FILE = f"""
[echo]
listen = tcp:9000:interface=127.0.0.1
listen_udp = udp:9001:interface=127.0.0.1
[file]
enabled = true
root = {ROOT / "sockd" / "data" / "files"}
"""


class DescriptorLimitTests(SynchronousTestCase):
    def start(
        self, text: str, limits: Limits, sections: tuple[str, ...] = ("echo", "file")
    ) -> tuple[DescriptorLimit, list[dict[str, object]]]:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = DescriptorLimit(
            settings(text), sections, limits.getrlimit, limits.setrlimit
        )
        service.privilegedStartService()
        service.startService()
        return service, [e for e in events if e["log_level"] == LogLevel.warn]

    def test_budget_is_explicit(self) -> None:
        self.assertEqual(
            descriptor_budget(settings(ECHO_AND_FILE), ["echo", "file"]),
            [
                ("reserve", 64),
                ("[echo] max_connections", 1000),
                ("[file] max_connections x 2", 512),
                ("listeners", 3),
            ],
        )
        writable = settings(
            ECHO_AND_FILE
            + "writable = true\nupload_allow = 127.0.0.1\n"
            + "[metrics]\nenabled = true\n[sockd]\nworkers = 4\n"
        )
        self.assertEqual(
            descriptor_budget(writable, ["file"]),
            [
                ("reserve", 64),
                ("[file] max_connections x 3", 768),
                ("[metrics] max_connections", 64),
                ("[sockd] workers' pipes", 9),
                ("listeners", 2),
            ],
        )

    def test_soft_limit_raised_to_the_hard_one(self) -> None:
        limits = Limits(1024, 524288)
        service, warnings = self.start(ECHO_AND_FILE, limits)
        self.assertEqual(limits.set, [(524288, 524288)])
        self.assertEqual(service.limit, 524288)
        self.assertEqual(warnings, [])

    def test_caps_over_the_limit_are_named(self) -> None:
        # The case: 1000 + 256 connections, each within its caps,
        # under a limit of 1024 that cannot be raised.
        limits = Limits(1024, 1024)
        service, warnings = self.start(ECHO_AND_FILE, limits)
        self.assertEqual(limits.set, [])
        self.assertEqual(service.limit, 1024)
        (warning,) = warnings
        text = formatEvent(warning)
        for fragment in [
            "can need 1579 open files",
            "[echo] max_connections 1000, [file] max_connections x 2 512",
            "may open 1024 (RLIMIT_NOFILE)",
            "lower [echo] max_connections or [file] max_connections",
            "LimitNOFILE=",
        ]:
            self.assertIn(fragment, text)

    def test_caps_within_the_limit_are_quiet(self) -> None:
        # 64 + 500 + 100 x 2 + 3 = 767 descriptors at most
        text = ECHO_AND_FILE.replace("[file]", "max_connections = 500\n[file]")
        _, warnings = self.start(text + "max_connections = 100\n", Limits(1024, 1024))
        self.assertEqual(warnings, [])

    def test_refused_raise_keeps_the_soft_limit(self) -> None:
        limits = Limits(1024, 4096, OSError(1, "Operation not permitted"))
        service, warnings = self.start(ECHO_AND_FILE, limits)
        self.assertEqual(service.limit, 1024)
        self.assertEqual(len(warnings), 1)

    def test_reload_checks_the_new_caps(self) -> None:
        service, warnings = self.start(
            "[echo]\nlisten_udp =\n", Limits(2048, 2048), ("echo",)
        )
        self.assertEqual(warnings, [])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service.reconfigure(settings("[echo]\nlisten_udp =\nmax_connections = 5000\n"))
        self.assertEqual(
            [e["needed"] for e in events if e["log_level"] == LogLevel.warn], [5065]
        )

    def test_started_first_in_the_main_process_only(self) -> None:
        options = tap.Options()
        options.parseOptions(["--config", write_ini(self, "[echo]\nlisten_udp =\n")])
        top = tap.makeService(options, reactor=UDPMemoryReactor())
        self.assertIsInstance(next(iter(top)), DescriptorLimit)
        worker = make_daemon_service(
            options.config, {"echo": echo_tap.build}, UDPMemoryReactor(), inherited={}
        )
        self.assertFalse(any(isinstance(s, DescriptorLimit) for s in worker))
