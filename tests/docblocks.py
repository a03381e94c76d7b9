"""
The code blocks of README.md and docs/*.md as tests, read with Sybil.

Every fenced block has a language.  What the harness does with it:

- C{console}: C{$ command} lines, each followed by the output it shows.  Each
  command runs in bash; its output (stdout and stderr, as a terminal shows
  them, CRLF shown as a line end) must match the lines shown, where C{...}
  stands for any text (doctest's ELLIPSIS).  Lines a person types into an
  interactive command are named by a directive before the block,
  C{<!-- docs: typed LINE -->}: the harness types them, waits for the output
  shown, then ends the command as Ctrl-C would.
- C{sh}: commands (a trailing C{\\} continues a line); each must exit 0.
- C{ini}: a sockd configuration fragment, parsed by C{sockd.core.config.parse}
  alone (errors name the document's line) and merged into the shipped
  default file (the context the docs mean: "add this to the file").
  C{<!-- docs: section NAME -->} names the section of a fragment without a
  header; C{<!-- docs: sockets UNIT -->} parses it as the daemon started by
  that C{.socket} unit sees it, with the unit's sockets passed in.
- C{systemd}: a drop-in for the unit named by C{<!-- docs: unit UNIT -->},
  checked with C{systemd-analyze verify} beside the shipped units.
- C{text}: output, diagrams, synopses, other programs' files: not run,
  unless C{<!-- docs: output of COMMAND -->} says which command prints it;
  then that command's output must hold the same lines (spaces and
  parenthesised notes aside, in any order).

A block, or some of its commands, that cannot run here is marked by a
visible sentence right before it (the directives aside):
C{*Not run by the test suite: REASON.*} for the whole block, or
C{*Not run by the test suite (`CMD`, `CMD`): REASON.*} for the commands that
start with those words (the program's directory aside).  A command the
harness refuses (C{systemctl}, C{pip install}, a path outside its
directories, a port it does not serve, a daemonizing twistd, ...) fails
its block unless so marked, as does a marker that names no command.

Commands run in bash against real daemons on ephemeral ports of 127.0.0.1
(the harness rewrites the documented ports to theirs, C{SERVICE_PORTS}), in
a scratch directory that links to the checkout's files, with
C{$SOCKD_CONFIG} naming the default file on ephemeral ports.  System paths
the docs use (C{/etc/sockd}, C{/opt/sockd/bin}, ...) are mapped into a
scratch tree (C{SYSTEM_PATHS}; C{/opt/sockd} is the venv the tests run in).
The README starts from nothing: C{twistd} and C{sockd} are on PATH only
after its line that activates the venv; docs/ follow the README.  A
foreground daemon (C{twistd -n}, C{make run}) runs until it logs
C{sockd: ready} and answers, is stopped with SIGTERM and must shut down
cleanly.

C{python -m tests.docblocks} prints each document's blocks and markers.
"""

from __future__ import annotations

import configparser
import contextlib
import doctest
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sybil import Document, Example, Region, Sybil
from sybil.parsers.markdown.lexers import (
    DirectiveInHTMLCommentLexer,
    RawFencedCodeBlockLexer,
)

from tests.helpers import ROOT, Daemon, runnable_units

#: the documents whose blocks are tests, relative to the checkout
DOCUMENTS = ("README.md", "docs/*.md")
#: languages the harness runs or checks, and those it only shows
CHECKED = ("console", "sh", "ini", "systemd")
SHOWN = ("text",)
#: the directives, C{<!-- docs: NAME ARGUMENTS -->}
DIRECTIVES = ("typed", "section", "sockets", "unit", "output of")

READY = re.compile(r"sockd: ready")
STOPPED = "Main loop terminated"
#: seconds: a plain command, a foreground daemon's start and its stop
COMMAND_TIMEOUT = 15.0
#: C{make dist} builds a wheel
BUILD_TIMEOUT = 120.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

#: the documented ports (the default configuration's) -> (service, kind) of
#: the harness's daemon answering for them
SERVICE_PORTS = {
    9000: ("echo", "TCP"),
    9001: ("echo", "UDP"),
    8001: ("chat", "UDP"),
    8898: ("file", "TCP"),
}
#: docs/deploy.md's TLS echo (`openssl s_client -connect echo.internal:7443`),
#: served with the certificate that document makes in /etc/sockd/tls
TLS_PORT = 7443
#: the document a newcomer starts from, with nothing installed
ENTRY = "README.md"
#: a command that puts the venv's programs on PATH
ACTIVATE = re.compile(r"^(?:\.|source)\s+(?:\S*/)?\.venv/bin/activate\s*(?:#.*)?$")
#: host names the docs use for this machine
LOCAL_NAMES = ("127.0.0.1", "localhost", "echo.internal")
#: system directories the docs use, mapped into the harness's scratch tree
SYSTEM_PATHS = (
    "/etc/sockd",
    "/opt/sockd",
    "/run/sockd",
    "/run/credentials",
    "/var/log/sockd",
    "/var/lib/sockd",
    "/srv/sockd",
)
#: any other path under these is refused (the test must not touch the system)
SYSTEM_ROOTS = ("/etc/", "/opt/", "/var/", "/run/", "/srv/", "/usr/local/", "/home/")
#: commands that cannot run here, with the reason a marker should give
REFUSED = (
    (re.compile(r"\bsystemctl\b"), "needs systemd as PID 1"),
    (re.compile(r"\bjournalctl\b"), "reads the systemd journal"),
    (re.compile(r"\bsudo\b"), "runs as another user"),
    (re.compile(r"\bapt(-get)?\b"), "installs system packages"),
    (re.compile(r"\bpip3?\s+install\b"), "installs packages"),
    (re.compile(r"(^|\s)--uid\b"), "switches user (root only) and daemonizes"),
)
MAKE_TARGETS = {
    "test": "runs this test suite",
    "unit": "runs this test suite",
    "lint": "runs this test suite's linters",
    "typecheck": "runs this test suite's type checker",
    "bench": "takes minutes",
    "soak": "takes minutes",
    "clean": "removes the venv the tests run in",
}
#: environment that would change how a daemon started by a command behaves
#: (systemd's, and an outer make's)
SCRUBBED_ENV = (
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "NOTIFY_SOCKET",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "SOCKD_CONFIG",
)


class DocError(AssertionError):
    """A block that is wrong, or marked wrongly."""


# --- reading the documents --------------------------------------------------


@dataclass(frozen=True)
class NotRun:
    """A visible "Not run by the test suite" marker."""

    reason: str
    #: command prefixes it covers; empty: the whole block
    commands: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    """One fenced block, with the marker and directives right before it."""

    path: str
    line: int
    language: str
    source: str
    not_run: NotRun | None = None
    directives: tuple[tuple[str, str], ...] = ()
    #: what is wrong with the markup itself
    problem: str | None = None

    @property
    def first_line(self) -> int:
        """The document line of the block's first line of content."""
        return self.line + 1

    def directive(self, name: str) -> str | None:
        values = [value for key, value in self.directives if key == name]
        return values[0] if values else None

    def directive_values(self, name: str) -> list[str]:
        return [value for key, value in self.directives if key == name]

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}-{self.language or 'none'}"


FENCE_INFO = re.compile(r"(?P<language>[^\s`]*)(?P<info>[^\n`]*)$\n", re.MULTILINE)
MARKER = re.compile(
    r"^[*_]?Not run by the test suite(?: \((?P<which>[^)]*)\))?: "
    r"(?P<reason>.+?)\.?[*_]?$",
    re.DOTALL,
)
COMMENT_END = re.compile(r"[ \t]*--+>")
LOOKS_LIKE_MARKER = re.compile(r"not run by the test", re.IGNORECASE)


class BlockParser:
    """
    A Sybil parser: every fenced block of a document becomes an example,
    with the marker and directives that precede it.
    """

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.fences = RawFencedCodeBlockLexer(info_pattern=FENCE_INFO)
        self.comments = DirectiveInHTMLCommentLexer(directive="docs", arguments=".*?")

    def __call__(self, document: Document) -> Iterable[Region]:
        for fence, block in self.blocks(document):
            shown_only = block.language in SHOWN and not block.problem
            if shown_only and not (block.directive("output of") or block.not_run):
                continue
            yield Region(fence.start, fence.end, block, evaluate)

    def blocks(self, document: Document) -> Iterator[tuple[Region, Block]]:
        """Every fenced block of C{document}, checked or only shown."""
        path = self._name(document.path)
        directives = sorted(self.comments(document), key=lambda r: r.start)
        previous_end = 0
        for fence in self.fences(document):
            mine = [
                d
                for d in directives
                if previous_end <= d.start and d.end <= fence.start
            ]
            yield fence, self._block(document, path, fence, previous_end, mine)
            previous_end = fence.end

    def _name(self, path: str) -> str:
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return path

    def _block(
        self,
        document: Document,
        path: str,
        fence: Region,
        previous_end: int,
        directives: list[Region],
    ) -> Block:
        text = document.text
        line = text.count("\n", 0, fence.start) + 1
        language = fence.lexemes["language"]
        source = str(fence.lexemes["source"])
        problems: list[str] = []
        if not language:
            problems.append("a fenced block needs a language")
        elif language not in CHECKED + SHOWN:
            problems.append(
                f"unknown language {language!r}; expected one of "
                + ", ".join(CHECKED + SHOWN)
            )
        if fence.lexemes["info"].strip():
            problems.append("nothing may follow the language on the fence line")
        # Directives count only if nothing but blank lines and other
        # directives lies between them and the fence.
        adjacent: list[Region] = []
        end = fence.start
        for directive in reversed(directives):
            # (Sybil's region of a one-line comment stops before its -->.)
            closing = COMMENT_END.match(text, directive.end)
            after = closing.end() if closing else directive.end
            if text[after:end].strip():
                break
            adjacent.insert(0, directive)
            end = directive.start
        parsed: list[tuple[str, str]] = []
        for directive in adjacent:
            arguments = directive.lexemes["arguments"].strip()
            name = next(
                (
                    k
                    for k in DIRECTIVES
                    if arguments == k or arguments.startswith(k + " ")
                ),
                None,
            )
            if name is None:
                problems.append(
                    f"unknown directive <!-- docs: {arguments} -->; expected "
                    + ", ".join(DIRECTIVES)
                )
                continue
            parsed.append((name, arguments[len(name) :].strip()))
        not_run = self._marker(text[previous_end:end], problems)
        return Block(
            path=path,
            line=line,
            language=language,
            source=source,
            not_run=not_run,
            directives=tuple(parsed),
            problem="; ".join(problems) or None,
        )

    @staticmethod
    def _marker(before: str, problems: list[str]) -> NotRun | None:
        """The marker: the paragraph right before the block (and directives)."""
        paragraphs = [p for p in re.split(r"\n[ \t]*\n", before) if p.strip()]
        if not paragraphs:
            return None
        lines = paragraphs[-1].strip().splitlines()
        last = " ".join(line.strip() for line in lines)
        if not LOOKS_LIKE_MARKER.search(last):
            return None
        match = MARKER.match(last)
        if match is None:
            problems.append(
                f"malformed marker {last!r}; expected '*Not run by the test "
                "suite: REASON.*' or '*Not run by the test suite (`CMD`): REASON.*'"
            )
            return None
        which = match.group("which")
        commands: tuple[str, ...] = ()
        if which is not None:
            commands = tuple(re.findall(r"`([^`]+)`", which))
            if not commands:
                problems.append(f"marker {last!r} names no `command`")
        return NotRun(match.group("reason").strip(), commands)


def sybil(root: Path = ROOT) -> Sybil:
    return Sybil(parsers=[BlockParser(root)], patterns=list(DOCUMENTS), path=str(root))


def documents(root: Path = ROOT) -> list[Path]:
    found: list[Path] = []
    for pattern in DOCUMENTS:
        found.extend(sorted(root.glob(pattern)))
    return found


def examples(root: Path = ROOT) -> list[Example]:
    """Every example of every document, in document order."""
    reader = sybil(root)
    return [each for path in documents(root) for each in reader.parse(path)]


def block_holding(path: Path, text: str, root: Path = ROOT) -> Block:
    """The one fenced block of C{path} (checked or only shown) holding C{text}."""
    document = Document(path.read_text(), str(path))
    (block,) = [
        block for _, block in BlockParser(root).blocks(document) if text in block.source
    ]
    return block


def unfenced_blocks(text: str) -> list[int]:
    """
    Lines (1-based) where an indented code block starts: four spaces more
    than the list item (or paragraph) it belongs to, after a blank line.
    Fenced blocks are the only kind the harness sees.
    """
    found: list[int] = []
    indent = 0  # the content indent of the list item we are in
    blank = True
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        opening = re.match(r"(`{3,}|~{3,})", stripped)
        if opening:
            fence = opening.group(1)
            blank = False
            continue
        if not stripped:
            blank = True
            continue
        here = len(line) - len(stripped)
        item = re.match(r"\s*(?:[-*+]|\d+[.)])\s+", line)
        if blank and here >= indent + 4:
            found.append(number)
        elif item:
            indent = item.end()
        elif blank and here < indent:
            indent = here
        blank = False
    return found


# --- commands ---------------------------------------------------------------


@dataclass
class Command:
    """A command as the docs show it, with what is typed and what it shows."""

    text: str
    line: int
    typed: list[str] = field(default_factory=list)
    #: lines shown after it (console blocks), None for an C{sh} block
    expected: list[str] | None = None


def sh_commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    pending: list[str] = []
    start = 0
    for offset, line in enumerate(block.source.splitlines()):
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = block.first_line + offset
        pending.append(line.rstrip())
        if not line.rstrip().endswith("\\"):
            commands.append(Command(_join(pending), start))
            pending = []
    if pending:
        raise DocError(f"line {start}: a command ends in a continuation")
    return commands


def console_commands(block: Block) -> list[Command]:
    typed = list(block.directive_values("typed"))
    commands: list[Command] = []
    pending: list[str] = []
    for offset, line in enumerate(block.source.splitlines()):
        number = block.first_line + offset
        if pending:
            pending.append(line.rstrip())
        elif line.startswith("$ "):
            pending = [line[2:].rstrip()]
            commands.append(Command("", number, expected=[]))
        elif not commands:
            raise DocError(f"line {number}: a console block starts with `$ command`")
        else:
            assert commands[-1].expected is not None
            if typed and line == typed[0]:
                commands[-1].typed.append(typed.pop(0))
            else:
                commands[-1].expected.append(line)
            continue
        if not pending[-1].endswith("\\"):
            commands[-1].text = _join(pending)
            pending = []
    if pending:
        raise DocError("a console block ends in a continued command")
    if typed:
        raise DocError(f"typed lines not found in the block: {typed}")
    return commands


def commands_of(block: Block) -> list[Command]:
    if block.language == "console":
        return console_commands(block)
    return sh_commands(block)


def _join(lines: list[str]) -> str:
    return " ".join(line.rstrip("\\").strip() for line in lines)


def covered_by(command: str, prefixes: Iterable[str]) -> bool:
    """Whether a marker's C{`CMD`} names C{command}."""
    words = command.split()
    if words:
        words[0] = os.path.basename(words[0])
    shown = " ".join(words)
    return any(shown == p or shown.startswith(p + " ") for p in prefixes)


def refusal(command: str) -> str | None:
    """Why the harness will not run C{command}, if it will not."""
    words = _words(command)
    for pattern, reason in REFUSED:
        if pattern.search(" ".join(words)):
            return reason
    if words and os.path.basename(words[0]) == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        if targets not in (["run"], ["dist"]):
            return next(
                (MAKE_TARGETS[t] for t in targets if t in MAKE_TARGETS),
                f"make {' '.join(targets)} is not a target the harness runs",
            )
    if _twistd(words) and not (
        {"-n", "--nodaemon", "--help"} & set(words)
        or any(w.startswith("--nodaemon") for w in words)
    ):
        return "a daemonizing twistd would outlive the test"
    return None


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError as e:
        raise DocError(f"{command}: {e}") from None


def _twistd(words: list[str]) -> bool:
    return any(os.path.basename(w) == "twistd" for w in words)


def serves(command: str) -> bool:
    """A foreground daemon: it runs until stopped."""
    words = _words(command)
    if words[:2] == ["make", "run"]:
        return True
    return _twistd(words) and bool({"-n", "--nodaemon"} & set(words))


# --- the harness ------------------------------------------------------------


@dataclass
class Outcome:
    """What a command printed, and how it ended."""

    output: str
    status: int | None


class Harness:
    """
    The daemons, directories and environment the docs' commands run in; one
    per test module.  L{close} stops everything it started.
    """

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.bin = Path(sys.executable).parent
        self.scratch = Path(tempfile.mkdtemp(prefix="sockd-docs-"))
        self.sysroot = self.scratch / "sysroot"
        self.workdir = self.scratch / "work"
        self.config_dir = self.sysroot / "etc" / "sockd"
        self.ini_base = self.scratch / "ini"
        self.daemons: list[Daemon] = []
        self.groups: list[subprocess.Popen[bytes]] = []
        self.ports: dict[int, int] = {}
        self._main: Daemon | None = None
        self._tls: Daemon | None = None
        #: whether the venv's programs are on PATH for the command run now
        self.activated = False
        #: seconds a command (or an interactive one's answer) may take
        self.timeout = COMMAND_TIMEOUT
        self._activations: list[int] | None = None

    # set-up

    def open(self) -> Harness:
        for tool in ("sockd", "twistd"):
            if not (self.bin / tool).exists():
                pytest.skip(
                    f"{tool} is not beside {sys.executable}: run the tests "
                    "from the venv (make test)"
                )
        self.workdir.mkdir(parents=True)
        for entry in self.root.iterdir():
            if entry.name not in (".git", ".venv"):
                (self.workdir / entry.name).symlink_to(entry)
        # make run and ". .venv/bin/activate" use the venv these tests run in.
        (self.workdir / ".venv").symlink_to(sys.prefix)
        for path in SYSTEM_PATHS:
            self.mapped(path).mkdir(parents=True, exist_ok=True)
        # /opt/sockd is the venv the docs install: this one.
        self.mapped("/opt/sockd/bin").symlink_to(self.bin)
        # The default configuration on ephemeral ports, where the docs put
        # the configuration file, with the sample files.
        samples = self.root / "sockd" / "data" / "files"
        shutil.copytree(samples, self.config_dir / "files")
        self.config_text = ephemeral(self.default_text())
        (self.config_dir / "sockd.ini").write_text(self.config_text)
        # Where INI blocks are parsed: the files they name are there (the
        # sample files, key pairs beside the file, in tls/ and files-tls/,
        # those LoadCredential= hands over, and a CA in ca/).
        self.ini_base.mkdir()
        shutil.copytree(samples, self.ini_base / "files")
        for directory in (
            self.ini_base,
            self.ini_base / "tls",
            self.ini_base / "files-tls",
            self.mapped("/run/credentials/sockd-echo.service"),
        ):
            self._write_pair(directory)
        # docs/deploy.md's private CA, as `sockd cert --ca ca` writes it.
        from sockd.client.cert import CA_CERT, CA_KEY, make_ca, write_pair

        write_pair(self.ini_base / "ca", *make_ca(), names=(CA_CERT, CA_KEY))
        return self

    def default_text(self) -> str:
        return (self.root / "sockd" / "data" / "sockd.ini").read_text()

    @staticmethod
    def _write_pair(directory: Path) -> None:
        from sockd.client.cert import make_certificate, write_pair

        write_pair(directory, *make_certificate("localhost"))

    def mapped(self, path: str) -> Path:
        return self.sysroot / path.lstrip("/")

    def main_daemon(self) -> Daemon:
        """C{twistd sockd} with every service of the default file, started once."""
        if self._main is None:
            daemon = Daemon("sockd", self.config_text, directory=self.config_dir)
            self.daemons.append(daemon)
            self._main = daemon.start(START_TIMEOUT)
            for documented, (service, kind) in SERVICE_PORTS.items():
                self.ports[documented] = daemon.port(service, kind)
        return self._main

    def tls_daemon(self) -> Daemon:
        if self._tls is None:
            tls = self.mapped("/etc/sockd/tls")
            if not (tls / "cert.pem").exists():
                raise DocError(
                    f"port {TLS_PORT} is the TLS echo with the certificate "
                    "docs/deploy.md makes in /etc/sockd/tls: none there yet"
                )
            ini = (
                "[echo]\n"
                f"listen = ssl:0:interface=127.0.0.1:privateKey={tls}/key.pem"
                f":certKey={tls}/cert.pem\n"
                "listen_udp =\n"
            )
            directory = self.scratch / "tls-echo"
            directory.mkdir()
            daemon = Daemon("sockd-echo", ini, directory=directory)
            self.daemons.append(daemon)
            self._tls = daemon.start(START_TIMEOUT)
            self.ports[TLS_PORT] = daemon.port("echo", "TCP")
        return self._tls

    def close(self) -> None:
        for process in self.groups:
            _stop(process)
        for daemon in self.daemons:
            daemon.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def environment(self, command: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p != str(self.bin)]
        if self.activated:
            path.insert(0, str(self.bin))
        env["PATH"] = os.pathsep.join(path)
        # A daemon started without --config reads this, not the packaged
        # file with its fixed ports; make run's CONFIG likewise.
        env["SOCKD_CONFIG"] = str(self.config_dir / "sockd.ini")
        if command.startswith("make "):
            env["CONFIG"] = env["SOCKD_CONFIG"]
        return env

    # blocks

    def venv_activated(self, path: str, line: int) -> bool:
        """
        Whether a reader has the venv's programs (twistd, sockd) on PATH at
        this line: in the README after the line that activates it (the
        README starts from nothing), and throughout docs/, which follow it.
        """
        if path != ENTRY:
            return True
        if self._activations is None:
            self._activations = [
                command.line
                for example in examples(self.root)
                if example.parsed.path == ENTRY
                and example.parsed.language in ("sh", "console")
                for command in commands_of(example.parsed)
                if ACTIVATE.match(command.text)
            ]
        return any(where < line for where in self._activations)

    def check(self, block: Block) -> None:
        self.activated = self.venv_activated(block.path, block.line)
        if block.problem:
            raise DocError(f"{block.path}:{block.line}: {block.problem}")
        if block.language in SHOWN:
            if block.not_run:
                raise DocError(
                    f"{block.path}:{block.line}: a {block.language} block is "
                    "never run; the marker before it has nothing to mark"
                )
            self.check_output_of(block)
        elif block.language == "ini":
            self.check_ini(block)
        elif block.language == "systemd":
            self.check_drop_in(block)
        else:
            self.check_commands(block)

    def check_commands(self, block: Block) -> None:
        commands = commands_of(block)
        marker = block.not_run
        if marker and not marker.commands:
            return  # marked, visibly, with its reason: that is the check
        prefixes = marker.commands if marker else ()
        for prefix in prefixes:
            if not any(covered_by(c.text, [prefix]) for c in commands):
                raise DocError(
                    f"{block.path}:{block.line}: the marker names `{prefix}`, "
                    "which no command of the block starts with"
                )
        ran = 0
        for command in commands:
            if covered_by(command.text, prefixes):
                continue
            ran += 1
            self.activated = self.venv_activated(block.path, command.line)
            where = f"{block.path}:{command.line}: {command.text}"
            reason = refusal(command.text)
            if reason:
                raise DocError(
                    f"{where}\ncannot run here ({reason}): mark it with "
                    f"'*Not run by the test suite (`{command.text.split()[0]}`): "
                    "REASON.*' before the block"
                )
            try:
                self.run(command)
            except DocError as e:
                raise DocError(f"{where}\n{e}") from None
        if not ran:
            assert marker is not None  # every command named by its marker

    def run(self, command: Command) -> None:
        if ACTIVATE.match(command.text):
            # Its effect, PATH, is what venv_activated() gives later commands.
            outcome = self.execute(command.text)
            if outcome.status != 0:
                raise DocError(f"exit status {outcome.status}:\n{outcome.output}")
            return
        if serves(command.text):
            if command.text.startswith("make "):
                self.check_make_venv()
            self.serve(command.text)
            return
        text = self.rewrite(command.text)
        if command.typed:
            outcome = self.converse(text, command)
        else:
            outcome = self.execute(text)
            if outcome.status != 0:
                raise DocError(
                    f"ran: {text}\nexit status {outcome.status}:\n{outcome.output}"
                )
        if command.expected is not None:
            compare(command.expected, outcome.output, text)

    def check_make_venv(self) -> None:
        """Skip unless the venv the tests run in is make's, up to date (else
        make would install into it)."""
        result = subprocess.run(
            ["make", "-q", ".venv/.installed"],
            cwd=self.workdir,
            env=self.environment("make"),
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(
                f"{sys.prefix} is not a venv make has set up and kept up to "
                "date: run the tests with make test"
            )

    def rewrite(self, text: str) -> str:
        """The command with the harness's paths and ports."""
        text = self.map_paths(text)
        text = add_default_ports(text)

        def port(match: re.Match[str]) -> str:
            documented = int(match.group("port"))
            if documented in self.ports:
                pass
            elif documented == TLS_PORT:
                self.tls_daemon()
            elif documented in SERVICE_PORTS:
                self.main_daemon()
            else:
                raise DocError(
                    f"it talks to port {documented}, which no daemon of the "
                    "harness serves (SERVICE_PORTS)"
                )
            return f"127.0.0.1{match.group('sep')}{self.ports[documented]}"

        hosts = "|".join(re.escape(h) for h in LOCAL_NAMES)
        text = re.sub(
            rf"(?<![\w.-])(?:{hosts})(?P<sep>:| +)(?P<port>\d{{1,5}})\b", port, text
        )
        other = re.search(r"\b(?!127\.)\d{1,3}(?:\.\d{1,3}){3}\b", text)
        if other:
            raise DocError(f"it talks to {other.group(0)}, another machine")
        return text

    def map_paths(self, text: str) -> str:
        for path in SYSTEM_PATHS:
            text = re.sub(
                rf"(?<![\w/.]){re.escape(path)}(?=/|\s|$|[\"'])",
                str(self.mapped(path)),
                text,
            )
        for match in re.finditer(r"(?<![\w.~-])/[\w./-]+", text):
            if match.group(0).startswith(str(self.scratch)):
                continue
            if match.group(0).startswith(SYSTEM_ROOTS):
                raise DocError(
                    f"it uses {match.group(0)}, outside the test's directories"
                )
        return text

    def execute(self, text: str) -> Outcome:
        process = self._spawn(text, stdin=subprocess.DEVNULL)
        timeout = BUILD_TIMEOUT if text.startswith("make dist") else self.timeout
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            output, _ = process.communicate()
            raise DocError(
                f"ran: {text}\nstill running after {timeout}s (does it wait "
                "for typed input? then mark it as interactive):\n"
                + output.decode(errors="replace")
            ) from None
        return Outcome(output.decode(errors="replace"), process.returncode)

    def converse(self, text: str, command: Command) -> Outcome:
        """Type the lines shown, wait for the output shown, then end it."""
        assert command.expected is not None
        process = self._spawn(text, stdin=subprocess.PIPE)
        reader = _Reader(process)
        assert process.stdin is not None
        process.stdin.write("".join(f"{line}\n" for line in command.typed).encode())
        process.stdin.flush()
        want = _lines(command.expected)
        try:
            reader.wait(lambda got: _matches(want, _display(got)), self.timeout)
        except DocError as e:
            raise DocError(f"ran: {text}\nthe docs show:\n{want}{e}") from None
        finally:
            _stop(process, signal.SIGINT)
        return Outcome(reader.text(), None)

    def serve(self, shown: str) -> None:
        """Start a foreground daemon, wait until it is ready, stop it."""
        text, trigger = self.serve_rewrite(shown)
        process = self._spawn(text, stdin=subprocess.DEVNULL)
        reader = _Reader(process)
        connections: list[socket.socket] = []
        try:
            if trigger is not None:
                # systemd-socket-activate starts the daemon at the first
                # connection, as systemd does.
                reader.wait(lambda got: "Listening on" in got, START_TIMEOUT)
                connections.append(socket.create_connection(trigger, timeout=5))
            reader.wait(lambda got: bool(READY.search(got)), START_TIMEOUT)
            # twistd starts the services (and says ready) before the reactor
            # handles SIGTERM; an answer comes from the running reactor.
            answered(reader.text())
        except (DocError, OSError) as e:
            _stop(process, signal.SIGKILL)
            raise DocError(f"ran: {text}\n{e}\n{reader.text()}") from None
        finally:
            for each in connections:
                each.close()
        _stop(process, signal.SIGTERM)
        reader.finish()
        log = reader.text()
        if STOPPED not in log or "Traceback" in log:
            raise DocError(f"ran: {text}\ndid not stop cleanly on SIGTERM:\n{log}")

    def serve_rewrite(self, shown: str) -> tuple[str, tuple[str, int] | None]:
        """Ephemeral ports for a daemon the command starts itself."""
        text = self.map_paths(shown)
        text = re.sub(r"\b(tcp6?|udp6?|ssl):\d+", r"\1:0", text)
        free: dict[str, int] = {}

        def address(match: re.Match[str]) -> str:
            port = free.setdefault(match.group(2), free_port())
            return f"-l {match.group(1)}:{port}"

        text = re.sub(r"-l\s+([\d.]+):(\d+)", address, text)
        trigger = None
        listen = re.search(r"-l\s+([\d.]+):(\d+)", text)
        if listen and "systemd-socket-activate" in text:
            trigger = (listen.group(1), int(listen.group(2)))
        return text, trigger

    def _spawn(self, text: str, stdin: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["bash", "-c", text],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.environment(text),
            start_new_session=True,
        )
        self.groups.append(process)
        return process

    def check_output_of(self, block: Block) -> None:
        command = block.directive("output of")
        assert command is not None
        outcome = self.execute(self.rewrite(command.strip("`")))
        if outcome.status != 0:
            raise DocError(f"{command}: exit status {outcome.status}\n{outcome.output}")
        shown = {_normal(line) for line in block.source.splitlines() if line.strip()}
        printed = {
            _normal(line) for line in outcome.output.splitlines() if line.strip()
        }
        if shown != printed:
            raise DocError(
                f"{block.path}:{block.line}: {command} prints other lines\n"
                f"only in the docs: {sorted(shown - printed)}\n"
                f"only in its output: {sorted(printed - shown)}"
            )

    def check_ini(self, block: Block) -> None:
        if block.not_run:
            raise DocError(
                f"{block.path}:{block.line}: every ini block is parsed; "
                "remove the marker"
            )
        section = block.directive("section")
        padding = "\n" * (block.first_line - 1)
        if section:
            padding = padding[:-1] + f"[{section}]\n"
        text = self.map_paths(block.source)
        fragment = padding + text
        merged = merge_ini(
            self.default_text(), text if not section else f"[{section}]\n{text}"
        )
        sockets = block.directive("sockets")
        checks = [
            (fragment, block.path),
            (merged, f"{block.path}:{block.line} merged into sockd/data/sockd.ini"),
        ]
        for text_, source in checks:
            error = parse_ini(text_, source, self.ini_base, sockets, self.root)
            if error:
                hint = ""
                if "systemd passed" in error or "no socket was passed" in error:
                    hint = "\n(name the .socket unit: <!-- docs: sockets UNIT -->)"
                raise DocError(error + hint)

    def check_drop_in(self, block: Block) -> None:
        unit = block.directive("unit")
        if not unit:
            raise DocError(
                f"{block.path}:{block.line}: which unit is this a drop-in for? "
                "<!-- docs: unit NAME -->"
            )
        tool = shutil.which("systemd-analyze")
        if tool is None:
            pytest.skip("systemd-analyze is not installed")
        units = runnable_units(Path(tempfile.mkdtemp(dir=self.scratch)))
        if not (units / unit).exists():
            raise DocError(f"{block.path}:{block.line}: no unit {unit} in etc/systemd")
        drop_ins = units / f"{unit}.d"
        drop_ins.mkdir()
        (drop_ins / "docs.conf").write_text(block.source)
        result = subprocess.run(
            [tool, "verify", "--man=no", str(units / unit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0 or result.stderr.strip():
            raise DocError(
                f"{block.path}:{block.line}: systemd-analyze verify {unit} with "
                f"this drop-in:\n{result.stderr}"
            )


def evaluate(example: Example) -> None:
    """Sybil's evaluator: the module's harness checks the block."""
    harness: Harness = example.namespace["harness"]
    harness.check(example.parsed)


# --- INI -------------------------------------------------------------------


def ephemeral(text: str) -> str:
    """INI text with every listening port 0."""
    return re.sub(r"(?m)(^listen\w* = .*?\b(?:tcp6?|udp6?|ssl)):\d+", r"\1:0", text)


def merge_ini(base: str, fragment: str) -> str:
    """
    C{fragment}'s keys set in C{base}: each replaces that key's line (and its
    continuation lines) in its section, or is added at the section's end;
    new sections are added at the end.
    """
    reader = configparser.ConfigParser(interpolation=None, strict=False)
    reader.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        reader.read_string(fragment)
    except configparser.Error as e:
        raise DocError(
            f"{e}\n(a fragment without a [section]? <!-- docs: section NAME -->)"
        ) from None
    lines = base.splitlines()
    out: list[str] = []
    section = ""
    skipping = False

    def flush(name: str) -> None:
        if reader.has_section(name):
            for key, value in reader.items(name, raw=True):
                out.append(f"{key} = " + value.replace("\n", "\n    "))
            out.append("")

    for line in lines:
        header = re.match(r"\[([^]]+)\]\s*$", line)
        if header:
            flush(section)
            section = header.group(1).lower()
            skipping = False
        elif skipping and line[:1].isspace() and line.strip():
            continue
        else:
            skipping = False
            key = re.match(r"([A-Za-z0-9_.-]+)\s*[=:]", line)
            if key and reader.has_option(section, key.group(1).lower()):
                skipping = True
                continue
        out.append(line)
    flush(section)
    known = {m.group(1).lower() for m in re.finditer(r"(?m)^\[([^]]+)\]", base)}
    for name in reader.sections():
        if name not in known:
            out.append(f"[{name}]")
            flush(name)
    return "\n".join(out) + "\n"


def parse_ini(
    text: str, source: str, base: Path, sockets: str | None, root: Path
) -> str | None:
    """C{sockd.core.config.parse}'s error for C{text}, or None if it is valid."""
    if sockets is None:
        from sockd.core.config import ConfigError, parse

        try:
            parse(text, source, base)
        except ConfigError as e:
            return str(e)
        return None
    # systemd: endpoints are checked against the sockets passed in, which a
    # process only has from the start: parse in a child that has them.
    kinds = socket_kinds(root / "etc" / "systemd" / sockets)
    result = subprocess.run(
        [sys.executable, "-c", _ACTIVATED],
        input=json.dumps(
            {
                "text": text,
                "source": source,
                "base": str(base),
                "kinds": kinds,
                "name": sockets,
            }
        ),
        capture_output=True,
        text=True,
        cwd=root,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        return result.stdout + result.stderr
    return None


def socket_kinds(unit: Path) -> list[str]:
    """C{stream}/C{datagram} for each socket of a C{.socket} unit, in order."""
    kinds = []
    for line in unit.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "ListenStream":
            kinds.append("stream")
        elif key == "ListenDatagram":
            kinds.append("datagram")
    return kinds


#: a child's program: the sockets first (as systemd passes them, from fd 3),
#: then the parse; nothing of Twisted is imported before the variables are set
_ACTIVATED = """
import json, os, socket, sys
from pathlib import Path
request = json.load(sys.stdin)
held = []
for index, kind in enumerate(request["kinds"]):
    stream = kind == "stream"
    sock = socket.socket(type=socket.SOCK_STREAM if stream else socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    if stream:
        sock.listen()
    held.append(sock)
for index, sock in enumerate(held):
    os.dup2(sock.fileno(), 3 + index + 100)
for index in range(len(held)):
    os.dup2(3 + index + 100, 3 + index)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(held))
os.environ["LISTEN_FDNAMES"] = ":".join([request["name"]] * len(held))
from sockd.core.config import ConfigError, parse
try:
    parse(request["text"], request["source"], Path(request["base"]))
except ConfigError as e:
    print(e)
    sys.exit(1)
"""


# --- output ----------------------------------------------------------------


def compare(expected: list[str], output: str, text: str) -> None:
    want = _lines(expected)
    got = _display(output)
    if not _matches(want, got):
        raise DocError(f"ran: {text}\nthe docs show:\n{want}it printed:\n{got}")


def _lines(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def _display(output: str) -> str:
    """Output as a terminal shows it: CRLF is a line end."""
    return output.replace("\r\n", "\n")


def _matches(want: str, got: str) -> bool:
    checker = doctest.OutputChecker()
    return checker.check_output(want, got, doctest.ELLIPSIS)


def _normal(line: str) -> str:
    """A line without its parenthesised notes and extra spaces."""
    return " ".join(re.sub(r"\s*\([^)]*\)", "", line).split())


# --- processes ---------------------------------------------------------------


class _Reader:
    """Collects a process's output in a thread."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.chunks: list[bytes] = []
        self.done = False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self.changed:
                self.chunks.append(chunk)
                self.changed.notify_all()
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def text(self) -> str:
        with self.changed:
            return b"".join(self.chunks).decode(errors="replace")

    def wait(self, condition: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                got = b"".join(self.chunks).decode(errors="replace")
                if condition(got):
                    return
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    why = "it exited" if self.done else f"nothing after {timeout}s"
                    raise DocError(f"{why}; its output:\n{got}")
                self.changed.wait(left)

    def finish(self) -> None:
        with self.changed:
            while not self.done:
                self.changed.wait(STOP_TIMEOUT)


def _stop(
    process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGKILL
) -> None:
    """
    Signal the command and wait for it, then kill what is left of its
    process group.  Only the command is signalled: bash runs a lone command
    in its own process, and make passes a fatal signal on to its child
    (signalling the group too would give the daemon two).
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
    # Children that outlived the shell (a daemon it started).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


LISTENING = re.compile(r"\] \w+: listening on (TCP|UDP) ([\d.]+):(\d+)")


def answered(log: str) -> None:
    """
    Wait for an answer from the daemon that wrote C{log}, at its first
    listener: a line over TCP (echo answers any, the file server C{QUIT}),
    or a datagram (the echo and the chat answer one of this size).
    """
    match = LISTENING.search(log)
    if match is None:
        raise DocError("the daemon logged no listener")
    kind, host, port = match.group(1), match.group(2), int(match.group(3))
    if kind == "TCP":
        with socket.create_connection((host, port), timeout=COMMAND_TIMEOUT) as s:
            s.sendall(b"QUIT\r\n")
            if not s.recv(1):
                raise DocError(f"{host}:{port} closed without answering")
        return
    with socket.socket(type=socket.SOCK_DGRAM) as s:
        s.settimeout(COMMAND_TIMEOUT)
        s.sendto(b"is anyone there?\n", (host, port))
        s.recv(65536)


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (for tools that cannot
    take port 0)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise DocError("no port free for both TCP and UDP")


def add_default_ports(text: str) -> str:
    """A client's host without a port means its default port: write it out."""
    from sockd.client import chat, echo, fileproto, urls

    defaults = {
        "echo": echo.DEFAULT_PORT,
        "chat": chat.DEFAULT_PORT,
        "get": fileproto.DEFAULT_PORT,
        "ls": fileproto.DEFAULT_PORT,
        "stat": fileproto.DEFAULT_PORT,
        "put": fileproto.DEFAULT_PORT,
    }
    hosts = "|".join(re.escape(h) for h in LOCAL_NAMES)

    def client(match: re.Match[str]) -> str:
        return f"{match.group(0)}:{defaults[match.group(1)]}"

    text = re.sub(
        rf"\bsockd +({'|'.join(defaults)}) +(?:-\S+ +)*(?:{hosts})(?=[\s;|&)]|$)",
        client,
        text,
    )

    def url(match: re.Match[str]) -> str:
        return f"{match.group(0)}:{urls.DEFAULT_PORTS[match.group(1)]}"

    return re.sub(
        rf"\b({'|'.join(urls.DEFAULT_PORTS)})://(?:{hosts})(?=[/\s]|$)", url, text
    )


# --- a summary, for people ---------------------------------------------------


def summary(root: Path = ROOT) -> Iterator[str]:
    """Per document: blocks by language, and the markers with their reasons."""
    reader = sybil(root)
    for path in documents(root):
        text = path.read_text()
        total = len(
            list(
                RawFencedCodeBlockLexer(info_pattern=FENCE_INFO)(
                    Document(text, str(path))
                )
            )
        )
        blocks = [e.parsed for e in reader.parse(path)]
        counts: dict[str, int] = {}
        for block in blocks:
            counts[block.language] = counts.get(block.language, 0) + 1
        shown = ", ".join(f"{n} {language}" for language, n in sorted(counts.items()))
        name = path.relative_to(root).as_posix()
        yield f"{name}: {total} blocks; tested: {shown or 'none'}"
        for block in blocks:
            if block.not_run:
                which = ", ".join(block.not_run.commands) or "whole block"
                yield f"  line {block.line} ({which}): {block.not_run.reason}"


def main() -> int:
    for line in summary():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
