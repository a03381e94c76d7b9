"""Tests of sockd.core.config: parsing, validation messages, lookup order."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass, fields

from twisted.internet.endpoints import _SystemdParser
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

import sockd.core.config as config
from sockd.core.config import ConfigError
from tests.docblocks import block_holding
from tests.files.test_sendfile import self_signed_pem
from tests.helpers import ROOT, run_bounded, tempdir, unblock_fifo


def parse(text: str, **overrides: dict[str, str]) -> config.Config:
    return config.parse(textwrap.dedent(text), "test.ini", ROOT, overrides)


class DefaultsTests(SynchronousTestCase):
    def test_shipped_file_matches_dataclass_defaults(self) -> None:
        # Every key is present in the shipped file with its default, except
        # the lines marked as not the default; the dataclasses and the file
        # must not drift apart.
        text = (ROOT / "etc" / "sockd.ini").read_text()
        marked, section = set(), ""
        for line in text.splitlines():
            if line.startswith("["):
                section = line.strip("[]")
            elif "# not the default" in line:
                marked.add((section, line.partition("=")[0].strip()))
        self.assertEqual(
            marked, {("chat", "enabled"), ("file", "enabled"), ("file", "root")}
        )
        self.assertIn("except the three lines marked", " ".join(text.split()))
        shipped = config.load(str(ROOT / "etc" / "sockd.ini"))
        for section, keys in config.SCHEMA.items():
            defaults = getattr(config.Config(), section)
            for key in keys:
                self.assertRegex(text, rf"(?m)^{key} = ", f"[{section}] {key}")
                if (section, key) not in marked:
                    self.assertEqual(
                        getattr(getattr(shipped, section), key),
                        getattr(defaults, key),
                        f"[{section}] {key}",
                    )

    def test_etc_is_the_packaged_default(self) -> None:
        self.assertEqual(
            (ROOT / "etc" / "sockd.ini").resolve(), config.packaged_default().resolve()
        )

    def test_empty_file_gives_defaults(self) -> None:
        self.assertEqual(parse("").echo, config.EchoSettings())

    def test_all_defaults_on_loopback(self) -> None:
        shipped = config.load(str(ROOT / "etc" / "sockd.ini"))
        for section in ("echo", "chat", "file"):
            settings = getattr(shipped, section)
            for description in settings.listen + getattr(settings, "listen_udp", ()):
                self.assertIn("interface=127.0.0.1", description)


class SchemaTests(SynchronousTestCase):
    """The INI keys are the settings dataclasses' fields, with their parsers."""

    def test_every_field_is_a_key_in_field_order(self) -> None:
        classes = {
            "sockd": config.SockdSettings,
            "echo": config.EchoSettings,
            "chat": config.ChatSettings,
            "file": config.FileSettings,
            "metrics": config.MetricsSettings,
        }
        self.assertEqual([f.name for f in fields(config.Config)], ["source", *classes])
        self.assertEqual(list(config.SCHEMA), list(classes))
        for section, settings in classes.items():
            self.assertEqual(
                list(config.SCHEMA[section]), [f.name for f in fields(settings)]
            )

    def test_field_parser_reads_the_file(self) -> None:
        key = config.SCHEMA["chat"]["history"]
        self.assertEqual(key.parser("7", ROOT), 7)
        self.assertEqual(parse("[chat]\nhistory = 7\n").chat.history, 7)
        self.assertEqual(key.doc, "messages shown to a member joining a room")

    def test_defaults_are_class_attributes(self) -> None:
        # GuardedFactory reads its handshake timeout default from the class.
        self.assertEqual(config.SockdSettings.tls_handshake_timeout, 10.0)
        self.assertEqual(config.FileSettings.root, None)
        self.assertEqual(config.ChatSettings().redis_sentinels, ())

    def test_lists_are_marked_many(self) -> None:
        many = {
            (section, key)
            for section, keys in config.SCHEMA.items()
            for key, spec in keys.items()
            if spec.many
        }
        self.assertEqual(
            many,
            {
                ("sockd", "allow"),
                ("sockd", "deny"),
                ("sockd", "trusted_proxies"),
                ("echo", "listen"),
                ("echo", "listen_udp"),
                ("file", "upload_allow"),
                ("file", "upload_clients"),
                ("chat", "listen"),
                ("chat", "redis_sentinels"),
                ("file", "listen"),
                ("file", "listen_http"),
                ("metrics", "listen"),
            },
        )

    def test_a_plain_field_is_refused(self) -> None:
        @dataclass(frozen=True)
        class Settings:
            fine: int = config.setting(1, config.integer(0, 9))
            plain: int = 2

        with self.assertRaises(TypeError) as caught:
            config._keys(Settings)
        self.assertEqual(str(caught.exception), "Settings.plain is not a setting()")

    def test_option_needs_help_and_flags_start_false(self) -> None:
        with self.assertRaises(TypeError):
            config.setting(1, config.integer(0, 9), short="x")
        with self.assertRaises(TypeError):
            config.setting(True, config.boolean, "on", flag=True)


class ValueTests(SynchronousTestCase):
    def test_values_parsed(self) -> None:
        c = parse(
            """
            [echo]
            mode = RAW
            max_line_length = 64K
            idle_timeout = 2.5
            enabled = off
            listen = tcp:7007:interface=127.0.0.1
                     tcp:7008:interface=127.0.0.1
            listen_udp =
            """
        )
        self.assertEqual(c.echo.mode, "raw")
        self.assertEqual(c.echo.max_line_length, 65536)
        self.assertEqual(c.echo.idle_timeout, 2.5)
        self.assertFalse(c.echo.enabled)
        self.assertEqual(
            c.echo.listen,
            ("tcp:7007:interface=127.0.0.1", "tcp:7008:interface=127.0.0.1"),
        )
        self.assertEqual(c.echo.listen_udp, ())

    def assertError(self, text: str, *fragments: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse(text)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn("\n", message)
        return message

    def test_bad_integer_names_everything(self) -> None:
        self.assertError(
            """
            [echo]
            # a comment
            max_connections = lots
            """,
            "test.ini, line 4",
            "[echo] max_connections",
            "'lots'",
            "whole number from 1 to",
        )

    def test_out_of_range(self) -> None:
        self.assertError("[sockd]\nbacklog = 0\n", "[sockd] backlog", "1 to 65535")

    def test_nan_seconds(self) -> None:
        self.assertError("[echo]\nidle_timeout = nan\n", "idle_timeout", "seconds")

    def test_bad_choice(self) -> None:
        self.assertError("[echo]\nmode = lines\n", "expected one of: line, raw")

    def test_bad_boolean(self) -> None:
        self.assertError("[echo]\nenabled = maybe\n", "[echo] enabled", "true or false")

    def test_unknown_key_is_an_error(self) -> None:
        self.assertError(
            "[echo]\nmax_conections = 5\n",
            "line 2",
            "unknown key 'max_conections'",
            "max_connections",
        )

    def test_unknown_section_is_an_error(self) -> None:
        self.assertError("[ecko]\n", "unknown section [ecko]", "[echo]")

    def test_default_section_is_not_special(self) -> None:
        self.assertError("[DEFAULT]\nmode = raw\n", "unknown section")

    def test_duplicate_key(self) -> None:
        self.assertError("[echo]\nmode = raw\nmode = line\n", "test.ini", "mode")

    def test_syntax_error(self) -> None:
        self.assertError("mode = raw\n", "test.ini")

    def test_bad_stream_endpoint(self) -> None:
        self.assertError(
            "[echo]\nlisten = udp:9000\n", "[echo] listen", "not a stream endpoint"
        )
        self.assertError("[echo]\nlisten = tcp:notaport\n", "not a valid endpoint")

    def test_ssl_key_checked_at_parse_time(self) -> None:
        self.assertError(
            "[echo]\nlisten = ssl:9443:privateKey=missing.pem\n",
            "[echo] listen",
            "not a valid endpoint",
        )

    def test_bad_datagram_endpoint(self) -> None:
        self.assertError("[echo]\nlisten_udp = udp:99999\n", "0 to 65535")
        self.assertError("[echo]\nlisten_udp = tcp:9000\n", "not a datagram endpoint")
        self.assertError(
            "[echo]\nlisten_udp = udp:9000:interface=example.com\n", "not an IP"
        )

    def test_missing_root(self) -> None:
        self.assertError(
            "[file]\nroot = /nonexistent/sockd-root\n",
            "[file] root",
            "not an existing directory",
        )

    def test_enabled_with_nothing_to_listen_on(self) -> None:
        self.assertError(
            "[echo]\nlisten =\nlisten_udp =\n", "both listen and listen_udp are empty"
        )

    def test_cross_key_rule(self) -> None:
        self.assertError(
            "[echo]\nmax_connections = 5\nmax_connections_per_ip = 6\n",
            "max_connections_per_ip = 6 is larger than max_connections = 5",
        )

    def test_long_value_shortened(self) -> None:
        message = self.assertError("[echo]\nmode = " + "x" * 5000 + "\n")
        self.assertLess(len(message), 600)


class OverrideTests(SynchronousTestCase):
    def test_override_wins(self) -> None:
        c = parse("[echo]\nmode = line\n", echo={"mode": "raw"})
        self.assertEqual(c.echo.mode, "raw")

    def test_bad_override_says_command_line(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse("", echo={"max_line_length": "-1"})
        self.assertIn(
            "command line: [echo] max_line_length = '-1'", str(caught.exception)
        )

    def test_unknown_override(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse("", echo={"nope": "1"})
        self.assertIn("unknown key 'nope'", str(caught.exception))


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempdir(self)
        self.file = self.dir / "a.ini"
        self.file.write_text("[echo]\nmode = raw\n")

    def test_explicit_first(self) -> None:
        found = config.find_config(str(self.file), {"SOCKD_CONFIG": "/elsewhere"})
        self.assertEqual(found, self.file)

    def test_environment_second(self) -> None:
        self.assertEqual(
            config.find_config(None, {"SOCKD_CONFIG": str(self.file)}), self.file
        )

    def test_packaged_last(self) -> None:
        if os.path.exists(config.SYSTEM_CONFIG):
            self.skipTest(f"{config.SYSTEM_CONFIG} exists on this machine")
        self.assertEqual(config.find_config(None, {}), config.packaged_default())

    def test_load_relative_paths_from_file_directory(self) -> None:
        (self.dir / "files").mkdir()
        self.file.write_text("[file]\nroot = files\n")
        c = config.load(str(self.file))
        self.assertEqual(c.file.root, (self.dir / "files").resolve())

    def test_unreadable_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            config.load(str(self.dir / "missing.ini"))
        self.assertIn(
            "missing.ini: cannot read the configuration", str(caught.exception)
        )

    def test_not_utf8(self) -> None:
        self.file.write_bytes(b"[echo]\nmode = \xff\n")
        with self.assertRaises(ConfigError) as caught:
            config.load(str(self.file))
        self.assertIn("not UTF-8", str(caught.exception))


class EndpointCheckTests(SynchronousTestCase):
    """Every listen value is checked as a whole before anything binds."""

    def assertError(self, text: str, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse(text)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_port_out_of_range_names_file_line_and_key(self) -> None:
        self.assertError(
            "[echo]\nmode = line\nlisten = tcp:99999:interface=127.0.0.1\n",
            "test.ini, line 3",
            "[echo] listen = 'tcp:99999:interface=127.0.0.1'",
            "port '99999' is not a number from 0 to 65535",
        )
        self.assertError("[file]\nlisten = tcp:-1\n", "[file] listen", "0 to 65535")
        self.assertError("[echo]\nlisten = tcp:port=65536\n", "0 to 65535")
        self.assertError(
            "[metrics]\nlisten = ssl:70000:privateKey=k.pem\n",
            "[metrics] listen",
            "0 to 65535",
        )

    def test_a_later_endpoint_is_checked_too(self) -> None:
        self.assertError(
            "[echo]\nlisten = tcp:9000:interface=127.0.0.1\n"
            "         tcp:99999:interface=127.0.0.1\n",
            "test.ini, line 2",
            "'tcp:99999:interface=127.0.0.1'",
        )

    def test_interface_must_be_an_address(self) -> None:
        self.assertError(
            "[echo]\nlisten = tcp:9000:interface=example.com\n",
            "interface 'example.com' is not an IP address",
        )
        self.assertError("[echo]\nlisten = tcp:9000:interface=127.1\n", "not an IP")
        self.assertError("[echo]\nlisten = tcp:9000:interface=\n", "not an IP")
        self.assertError(
            "[echo]\nlisten = tcp6:9000:interface=127.0.0.1\n",
            "interface '127.0.0.1' is not an IPv6 address",
        )

    def test_unescaped_ipv6_colons(self) -> None:
        self.assertError(
            "[echo]\nlisten = tcp:9000:interface=::1\n",
            "too many ':'-separated fields",
            "\\:",
        )

    def test_backlog_must_be_a_positive_number(self) -> None:
        for bad in ("abc", "0", "-5", "70000"):
            self.assertError(
                f"[echo]\nlisten = tcp:9000:backlog={bad}\n",
                f"backlog '{bad}' is not a number from 1 to 65535",
            )

    def test_unix_path(self) -> None:
        self.assertError(
            "[echo]\nlisten = unix:/nonexistent/sockd/echo.sock\n",
            "/nonexistent/sockd is not an existing directory",
        )
        self.assertError(
            "[echo]\nlisten = unix:/tmp/" + "s" * 120 + "\n", "longer than 107 bytes"
        )

    def test_ssl_key_that_is_a_fifo_is_refused_without_reading(self) -> None:
        directory = tempdir(self)
        os.mkfifo(directory / "key.pem")
        (directory / "cert.pem").write_text("")
        text = "[echo]\nlisten = ssl:9443:privateKey=key.pem:certKey=cert.pem\n"
        with self.assertRaises(ConfigError) as caught:
            run_bounded(
                lambda: config.parse(text, "test.ini", directory),
                release=unblock_fifo(directory / "key.pem"),
            )
        self.assertIn(
            f"privateKey={directory / 'key.pem'} is a FIFO (named pipe), "
            "not a regular file",
            str(caught.exception),
        )

    def test_checked_without_test_modules(self) -> None:
        # Twisted's parser gets a stand-in reactor, not the test MemoryReactor.
        code = textwrap.dedent(
            """
            import sys
            import sockd.core.config as config
            config.parse(
                "[echo]\\nlisten = tcp:0:interface=127.0.0.1 unix:/tmp/sockd.s\\n"
            )
            print(sorted(m for m in sys.modules if m.startswith(
                ("twisted.internet.testing", "twisted.test", "twisted.trial")
            )))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=ROOT,
        )
        self.assertEqual(result.stdout, "[]\n", result.stderr)

    def test_valid_endpoints_pass(self) -> None:
        c = parse(
            r"""
            [echo]
            listen = tcp:0:interface=127.0.0.1
                     tcp:65535:interface=\:\:1
                     tcp6:9000:interface=\:\:1:backlog=10
                     tcp6:9001
                     tcp:9002:127.0.0.1:5
                     tcp:port=9003
            """
        )
        self.assertEqual(len(c.echo.listen), 6)


class OverrideSectionTests(SynchronousTestCase):
    def test_unknown_section_on_the_command_line_is_an_error(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse("", bogus={"key": "1"})
        self.assertEqual(
            str(caught.exception),
            "command line: --set bogus.key: unknown section [bogus]; expected: "
            "[sockd], [echo], [chat], [file], [metrics]",
        )

    def test_unknown_key_lists_the_allowed_ones(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse("", echo={"max_conections": "1"})
        self.assertIn("[echo] unknown key 'max_conections'", str(caught.exception))
        self.assertIn(
            "expected one of: enabled, listen, listen_udp, mode,", str(caught.exception)
        )


class MetricsSettingsTests(SynchronousTestCase):
    def test_max_connections(self) -> None:
        self.assertEqual(parse("").metrics.max_connections, 64)
        self.assertEqual(
            parse("[metrics]\nmax_connections = 5\n").metrics.max_connections, 5
        )
        with self.assertRaises(ConfigError) as caught:
            parse("[metrics]\nmax_connections = 0\n")
        self.assertIn("[metrics] max_connections = '0'", str(caught.exception))


class RegularFileTests(SynchronousTestCase):
    """The configuration is read only from a regular file, without blocking."""

    def setUp(self) -> None:
        self.dir = tempdir(self)

    def refused(self, path: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            run_bounded(lambda: config.load(path), release=unblock_fifo(path))
        return str(caught.exception)

    def test_fifo_is_refused_at_once(self) -> None:
        # No writer: reading it with open() would block forever.
        fifo = self.dir / "sockd.ini"
        os.mkfifo(fifo)
        self.assertEqual(
            self.refused(str(fifo)),
            f"{fifo}: cannot read the configuration: it is a FIFO (named pipe), "
            "not a regular file",
        )

    def test_directory_device_and_socket_are_refused(self) -> None:
        self.assertIn("it is a directory", self.refused(str(self.dir)))
        self.assertIn("it is a character device", self.refused(os.devnull))
        path = self.dir / "s.sock"
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(str(path))
            self.assertIn("it is a socket", self.refused(str(path)))

    def test_symlink_to_a_regular_file_is_read(self) -> None:
        (self.dir / "real.ini").write_text("[echo]\nmode = raw\n")
        (self.dir / "link.ini").symlink_to(self.dir / "real.ini")
        self.assertEqual(config.load(str(self.dir / "link.ini")).echo.mode, "raw")

    def test_huge_file_is_refused(self) -> None:
        path = self.dir / "big.ini"
        path.write_bytes(b"#" * (config.MAX_CONFIG_SIZE + 1))
        self.assertIn("larger than 1048576 bytes", self.refused(str(path)))


class ProductionCodeTests(SynchronousTestCase):
    def test_no_module_imports_test_helpers(self) -> None:
        test_only = ("twisted.internet.testing", "twisted.test", "twisted.trial")
        for path in sorted((ROOT / "sockd").rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    self.assertFalse(
                        name.startswith(("tests.", *test_only)) or name == "tests",
                        f"{path.relative_to(ROOT)} imports {name}",
                    )


def fake_systemd(case: SynchronousTestCase, count: int) -> None:
    """As if systemd had passed C{count} named sockets."""
    case.patch(
        _SystemdParser,
        "_sddaemon",
        ListenFDs(list(range(3, 3 + count)), ("sockd",) * count),
    )


class CommentTests(SynchronousTestCase):
    """A # or ; after whitespace starts a comment; elsewhere it is kept."""

    def test_trailing_comments(self) -> None:
        c = parse(
            """
            [echo]   # the echo
            listen = tcp:7007:interface=127.0.0.1    # the old port
                     tcp:7008:interface=127.0.0.1    # and one more
            mode = raw                               ; RFC 862
            max_line_length = 1K\t# tab before it
            """
        )
        self.assertEqual(
            c.echo.listen,
            ("tcp:7007:interface=127.0.0.1", "tcp:7008:interface=127.0.0.1"),
        )
        self.assertEqual((c.echo.mode, c.echo.max_line_length), ("raw", 1024))

    def test_hash_without_whitespace_before_it_is_kept(self) -> None:
        # Kept whole, so the value is refused as it is, not cut short.
        with self.assertRaises(ConfigError) as caught:
            parse("[echo]\nlisten = tcp:7007#x\n")
        self.assertIn("'tcp:7007#x'", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            parse("[chat]\nredis_url = redis://:pa#ss@127.0.0.1:6379\n")
        self.assertIn("'redis://:pa#ss@127.0.0.1:6379'", str(caught.exception))

    def test_redis_password_hash_is_percent_encoded(self) -> None:
        from sockd.chat.redis import parse_url

        c = parse(
            "[chat]\nbackend = redis\n"
            "redis_url = redis://:pa%23ss@127.0.0.1:6379/0   # '#' as %23\n"
        )
        self.assertEqual(c.chat.redis_url, "redis://:pa%23ss@127.0.0.1:6379/0")
        self.assertEqual(parse_url(c.chat.redis_url).password, "pa#ss")

    def test_value_cut_by_a_comment_says_so(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse("[chat]\ndefault_room = #lobby\n")
        message = str(caught.exception)
        self.assertIn("test.ini, line 2: [chat] default_room = ''", message)
        self.assertIn("from '#' on, the line is a comment", message)
        with self.assertRaises(ConfigError) as caught:
            parse("[echo]\nidle_timeout = 30s ;x\n")
        self.assertIn("from ';' on", str(caught.exception))
        # A room name's '#' may be left out.
        self.assertEqual(
            parse("[chat]\ndefault_room = lobby\n").chat.default_room, "lobby"
        )

    def test_no_note_without_a_comment(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse("[echo]\nidle_timeout = soon\n")
        self.assertNotIn("comment", str(caught.exception))

    def test_readme_examples(self) -> None:
        readme = ROOT / "README.md"
        c = parse(
            block_holding(
                readme, "node_name = chat-1          # unique per node"
            ).source
        )
        self.assertEqual((c.chat.node_name, c.chat.backend), ("chat-1", "redis"))
        c = parse(block_holding(readme, "# the old port").source)
        self.assertEqual(c.echo.listen, ("tcp:7007:interface=127.0.0.1",))
        self.assertEqual((c.echo.mode, c.echo.listen_udp), ("raw", ()))

    def test_deploy_socket_activation_example(self) -> None:
        fake_systemd(self, 2)
        block = block_holding(ROOT / "docs" / "deploy.md", "# ListenStream=127.0.0.1:7")
        c = parse(block.source)
        self.assertEqual(c.echo.listen, ("systemd:domain=INET:index=0",))
        self.assertEqual(c.echo.listen_udp, ("systemd:domain=INET:index=1",))


class ListenDefaultsTests(SynchronousTestCase):
    """A section that names where it listens gets no other default address."""

    def test_tcp_only(self) -> None:
        c = parse("[echo]\nlisten = tcp:7007:interface=127.0.0.1\n")
        self.assertEqual(c.echo.listen, ("tcp:7007:interface=127.0.0.1",))
        self.assertEqual(c.echo.listen_udp, ())

    def test_udp_only(self) -> None:
        c = parse("[echo]\nlisten_udp = udp:7007:interface=127.0.0.1\n")
        self.assertEqual(c.echo.listen, ())
        self.assertEqual(c.echo.listen_udp, ("udp:7007:interface=127.0.0.1",))

    def test_empty_turns_one_off_and_keeps_the_other_default(self) -> None:
        c = parse("[echo]\nlisten_udp =\n")
        self.assertEqual(c.echo.listen, config.EchoSettings().listen)
        self.assertEqual(c.echo.listen_udp, ())

    def test_other_keys_keep_both_defaults(self) -> None:
        c = parse("[echo]\nmode = raw\n")
        self.assertEqual(c.echo.listen, config.EchoSettings().listen)
        self.assertEqual(c.echo.listen_udp, config.EchoSettings().listen_udp)

    def test_command_line_names_where_too(self) -> None:
        tcp = {"listen": "tcp:7007:interface=127.0.0.1"}
        self.assertEqual(parse("", echo=tcp).echo.listen_udp, ())
        # What the file says is kept.
        c = parse("[echo]\nlisten_udp = udp:7:interface=127.0.0.1\n", echo=tcp)
        self.assertEqual(c.echo.listen_udp, ("udp:7:interface=127.0.0.1",))
        self.assertEqual(c.echo.listen, ("tcp:7007:interface=127.0.0.1",))

    def test_command_line_value_is_not_read_from_the_file(self) -> None:
        # The file's value is never used, so it does not stop start-up.
        c = parse("[file]\nroot = /nonexistent/sockd-root\n", file={"root": str(ROOT)})
        self.assertEqual(c.file.root, ROOT)


class RunsTests(SynchronousTestCase):
    """A daemon reads in full only the sections it runs."""

    SHARED = """
        [echo]
        listen = systemd:domain=INET:index=0
        listen_udp = systemd:domain=INET:index=1
                     ssl:7443:privateKey=/nonexistent/key.pem
        mode = nonsense
        [chat]
        enabled = true
        listen = systemd:domain=INET:index=0
        [file]
        enabled = false
        listen = systemd:domain=INET:index=0
        root = /nonexistent/sockd-root
        """

    def test_other_sections_are_not_read(self) -> None:
        fake_systemd(self, 1)
        c = config.parse(textwrap.dedent(self.SHARED), "test.ini", ROOT, runs=("chat",))
        self.assertEqual(c.chat.listen, ("systemd:domain=INET:index=0",))
        # Only enabled is read from the others; they keep their defaults.
        self.assertFalse(c.file.enabled)
        self.assertEqual(c.echo, config.EchoSettings())
        with self.assertRaises(ConfigError):
            config.parse(textwrap.dedent(self.SHARED), "test.ini", ROOT)

    def test_key_names_are_still_checked(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            config.parse("[echo]\nmod = raw\n", "test.ini", ROOT, runs=("chat",))
        self.assertIn("[echo] unknown key 'mod'", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            config.parse("[echo]\nenabled = maybe\n", "test.ini", runs=("chat",))
        self.assertIn("[echo] enabled", str(caught.exception))

    def test_rules_of_sections_not_read_do_not_apply(self) -> None:
        text = "[file]\nenabled = true\n[echo]\nlisten =\nlisten_udp =\n"
        c = config.parse(text, "test.ini", ROOT, runs=("chat",))
        self.assertTrue(c.file.enabled)
        with self.assertRaises(ConfigError) as caught:
            config.parse(text, "test.ini", ROOT, runs=("file",))
        self.assertIn("[file] is enabled but root is not set", str(caught.exception))

    def test_sockd_and_an_enabled_metrics_are_read(self) -> None:
        text = "[sockd]\nbacklog = 7\n[metrics]\nenabled = true\nmax_connections = 3\n"
        c = config.parse(text, "test.ini", ROOT, runs=("echo",))
        self.assertEqual((c.sockd.backlog, c.metrics.max_connections), (7, 3))
        text = "[metrics]\nenabled = false\nmax_connections = lots\n"
        c = config.parse(text, "test.ini", ROOT, runs=("echo",))
        self.assertFalse(c.metrics.enabled)

    def test_daemons_on_the_socket_activated_sample(self) -> None:
        # Each daemon under its own .socket unit, or started without one
        # on an address of its own: the other sections' sockets are not
        # looked up.
        import sockd.chat.tap
        import sockd.echo.tap
        import sockd.files.tap

        sample = str(ROOT / "etc" / "sockd-socket-activated.ini")
        chat = sockd.chat.tap.Options()
        chat.parseOptions(["--config", sample, "--listen", "udp:0"])
        self.assertEqual(chat.config.chat.listen, ("udp:0",))
        fake_systemd(self, 1)
        files = sockd.files.tap.Options()
        files.parseOptions(["--config", sample, "--root", str(ROOT)])
        self.assertEqual(files.config.file.root, ROOT)
        with self.assertRaises(SystemExit) as caught:
            sockd.echo.tap.Options().parseOptions(["--config", sample])
        self.assertIn("[echo] listen_udp", str(caught.exception))
        fake_systemd(self, 2)
        echo = sockd.echo.tap.Options()
        echo.parseOptions(["--config", sample])
        self.assertEqual(
            (echo.config.echo.mode, echo.config.echo.transform), ("raw", "none")
        )

    def test_single_daemon_runs_its_section_even_if_disabled(self) -> None:
        import sockd.files.tap

        ini = tempdir(self) / "sockd.ini"
        ini.write_text(f"[file]\nenabled = false\nroot = {ROOT}\n")
        files = sockd.files.tap.Options()
        files.parseOptions(["--config", str(ini)])
        self.assertTrue(files.config.file.enabled)


class HintTests(SynchronousTestCase):
    """The endpoints an error message offers as examples are valid."""

    def test_every_example_parses(self) -> None:
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        with self.assertRaises(ValueError) as caught:
            config.stream_endpoints("bogus:1", ROOT)
        hint = str(caught.exception).partition("such as ")[2]
        examples = [word.rstrip(",") for word in hint.split()]
        self.assertEqual(
            [e.split(":")[0] for e in examples], ["tcp", "tcp6", "ssl", "systemd"]
        )
        base = tempdir(self)
        pem = self_signed_pem()
        (base / "key.pem").write_text(pem)
        (base / "cert.pem").write_text(pem)
        fake_systemd(self, 1)
        for example in examples:
            (parsed,) = config.stream_endpoints(example, base)
            self.assertEqual(parsed.replace(f"{base}/", ""), example)
        tcp6 = serverFromString(MemoryReactor(), examples[1])
        self.assertEqual(tcp6._interface, "::1")  # type: ignore[attr-defined]


class GopherKeysTests(SynchronousTestCase):
    """C{[file] gopher_host} and C{gopher_port}: what Gopher menus advertise."""

    def test_good_values(self) -> None:
        self.assertEqual(
            (config.FileSettings.gopher_host, config.FileSettings.gopher_port),
            ("", None),
        )
        for host in ("gopher.example.org", "gopher.example.org.", "h", "10.0.0.1"):
            self.assertEqual(
                parse("", file={"gopher_host": host}).file.gopher_host, host
            )
        self.assertEqual(
            parse("", file={"gopher_host": " 2001:DB8::1 "}).file.gopher_host,
            "2001:db8::1",
        )
        self.assertEqual(parse("", file={"gopher_port": "70"}).file.gopher_port, 70)
        self.assertIsNone(parse("", file={"gopher_port": " "}).file.gopher_port)

    def test_bad_values(self) -> None:
        for host in (
            "a b",
            "-x.org",
            "x-.org",
            "a..b",
            "1.2.3.999",
            "x" * 64 + ".org",
            "h/70",
            "h:70",
        ):
            with self.assertRaises(config.ConfigError) as caught:
                parse("", file={"gopher_host": host})
            self.assertIn(
                "expected a DNS name (such as gopher.example.org) or an IP address",
                str(caught.exception),
            )
        for port in ("0", "65536", "-1", "seventy"):
            with self.assertRaises(config.ConfigError) as caught:
                parse("", file={"gopher_port": port})
            self.assertIn(
                f"[file] gopher_port = {port!r}: expected a port from 1 to 65535",
                str(caught.exception),
            )


class UploadRulesTests(SynchronousTestCase):
    """[file] upload_allow, upload_clients, client_certs and client_ca."""

    def setUp(self) -> None:
        self.dir = tempdir(self)
        (self.dir / "files").mkdir()
        self.pem = self.dir / "server.pem"
        self.pem.write_text(self_signed_pem())
        self.ssl = f"ssl:0:interface=127.0.0.1:privateKey={self.pem}"

    def parse(self, **keys: str) -> config.FileSettings:
        keys = {"enabled": "true", "root": str(self.dir / "files"), **keys}
        # Written in a file: relative paths are relative to its directory.
        text = "[file]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        return config.parse(text, "<test>", self.dir, runs=["file"]).file

    def refused(self, **keys: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.parse(**keys)
        return str(caught.exception)

    def test_writable_alone_is_refused_naming_the_keys(self) -> None:
        self.assertEqual(
            self.refused(writable="true"),
            "<test>: [file] writable = true but neither upload_allow nor "
            "upload_clients is set, so nobody could upload; expected "
            "upload_allow = NETWORKS (e.g. 192.0.2.0/24, or 0.0.0.0/0 ::/0 for "
            "everyone) and/or upload_clients = CERTIFICATE NAMES",
        )

    def test_upload_allow_networks(self) -> None:
        file = self.parse(writable="true", upload_allow="10.0.0.0/8 ::ffff:192.0.2.1")
        self.assertEqual(
            [str(n) for n in file.upload_allow], ["10.0.0.0/8", "192.0.2.1/32"]
        )
        self.assertIn("is not a network", self.refused(upload_allow="10.0.0.0/33"))

    def test_client_certificates_and_names(self) -> None:
        file = self.parse(
            listen=self.ssl,
            writable="true",
            upload_clients="Alice backup.example.org alice",
            client_certs="optional",
            client_ca="server.pem",  # relative to the file
        )
        self.assertEqual(file.upload_clients, ("alice", "backup.example.org"))
        self.assertEqual((file.client_certs, file.client_ca), ("optional", self.pem))
        self.assertIn("is not a certificate name", self.refused(upload_clients="ab -x"))
        self.assertIn(
            "expected one of: none, optional, required",
            self.refused(client_certs="maybe"),
        )

    def test_inconsistent_keys_are_refused(self) -> None:
        self.assertIn(
            "upload_clients is set but client_certs = none",
            self.refused(upload_clients="alice"),
        )
        self.assertIn(
            "client_certs = required but client_ca is not set",
            self.refused(listen=self.ssl, client_certs="required"),
        )
        self.assertIn(
            "client_certs = optional but no listen endpoint is ssl:",
            self.refused(client_certs="optional", client_ca=str(self.pem)),
        )
        self.assertIn(
            "client_ca is set but client_certs = none",
            self.refused(client_ca=str(self.pem)),
        )

    def test_client_ca_must_be_a_regular_pem_file(self) -> None:
        (self.dir / "empty.pem").write_text("not a certificate\n")
        self.assertIn("holds no PEM certificate", self.refused(client_ca="empty.pem"))
        self.assertIn("No such file", self.refused(client_ca="missing.pem"))
        self.assertIn("is a directory", self.refused(client_ca="files"))
        fifo = self.dir / "ca.fifo"
        os.mkfifo(fifo)
        with self.assertRaises(ConfigError) as caught:
            run_bounded(
                lambda: self.parse(client_ca=str(fifo)), release=unblock_fifo(fifo)
            )
        self.assertIn(
            "is a FIFO (named pipe), not a regular file", str(caught.exception)
        )
