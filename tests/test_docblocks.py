"""The docs harness itself: reading blocks, markers, rewriting, and failing."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sybil import Sybil

from tests import docblocks
from tests.docblocks import (
    Block,
    BlockParser,
    DocError,
    Harness,
    NotRun,
    add_default_ports,
    compare,
    console_commands,
    covered_by,
    ephemeral,
    merge_ini,
    refusal,
    sh_commands,
    unfenced_blocks,
)


def blocks(tmp_path: Path, markdown: str) -> list[Block]:
    """The blocks the harness takes from a document."""
    path = tmp_path / "doc.md"
    path.write_text(textwrap.dedent(markdown))
    reader = Sybil(parsers=[BlockParser(tmp_path)], path=str(tmp_path))
    return [example.parsed for example in reader.parse(path)]


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness.open()
    finally:
        harness.close()


def run(harness: Harness, language: str, source: str, **kwargs: Any) -> None:
    harness.check(Block("doc.md", 10, language, source, **kwargs))


class TestReading:
    def test_languages_markers_and_directives(self, tmp_path: Path) -> None:
        found = blocks(
            tmp_path,
            """
            Text.

            ```text
            not a test
            ```

            *Not run by the test suite: needs systemd as PID 1.*

            ```sh
            systemctl daemon-reload
            ```

            *Not run by the test suite (`nc -u`, `socat`): interactive.*

            <!-- docs: typed hello -->
            ```console
            $ nc 127.0.0.1 9000
            ```

            - in a list:

              <!-- docs: section echo -->
              ```ini
              listen = tcp:0
              ```
            """,
        )
        assert [(b.language, b.line) for b in found] == [
            ("sh", 10),
            ("console", 17),
            ("ini", 24),
        ]
        sh, console, ini = found
        assert sh.not_run == NotRun("needs systemd as PID 1")
        assert console.not_run == NotRun("interactive", ("nc -u", "socat"))
        assert console.directives == (("typed", "hello"),)
        assert ini.directive("section") == "echo"
        assert ini.source == "listen = tcp:0\n"
        assert all(b.problem is None for b in found)

    def test_bad_markup_is_a_problem(self, tmp_path: Path) -> None:
        found = blocks(
            tmp_path,
            """
            ```bash
            ls
            ```

            ```
            ls
            ```

            ```sh title
            ls
            ```

            <!-- docs: frobnicate -->
            ```sh
            ls
            ```

            Some prose, then: not run by the test suite, because.

            ```sh
            ls
            ```

            *Not run by the test suite (no command): why.*

            ```sh
            ls
            ```
            """,
        )
        problems = [b.problem or "" for b in found]
        assert "unknown language 'bash'" in problems[0]
        assert "needs a language" in problems[1]
        assert "nothing may follow the language" in problems[2]
        assert "unknown directive" in problems[3]
        assert "malformed marker" in problems[4]
        assert "names no `command`" in problems[5]

    def test_a_marker_on_a_text_block_is_an_example_that_fails(
        self, tmp_path: Path, harness: Harness
    ) -> None:
        (block,) = blocks(
            tmp_path,
            """
            *Not run by the test suite: why.*

            ```text
            output
            ```
            """,
        )
        with pytest.raises(DocError, match="nothing to mark"):
            harness.check(block)

    def test_directives_count_only_right_before_the_block(self, tmp_path: Path) -> None:
        (block,) = blocks(
            tmp_path,
            """
            <!-- docs: section echo -->

            A paragraph in between.

            ```ini
            [echo]
            ```
            """,
        )
        assert block.directives == ()

    def test_unfenced_blocks(self) -> None:
        text = textwrap.dedent(
            """\
            Para.

                indented code

            - item
              continued

                  indented code in the item

              ```sh
                  inside a fence
              ```
            - item two

              its second paragraph
            """
        )
        assert unfenced_blocks(text) == [3, 8]

    def test_the_summary_names_every_marker(self) -> None:
        lines = list(docblocks.summary())
        assert lines[0].startswith("README.md: ")
        assert any("(make test): it is the test suite itself" in x for x in lines)


class TestCommands:
    def test_sh_commands(self) -> None:
        block = Block(
            "doc.md",
            10,
            "sh",
            "# a comment\nfirst --x \\\n    --y   # why\n\nsecond\n",
        )
        commands = sh_commands(block)
        assert [(c.text, c.line) for c in commands] == [
            ("first --x --y   # why", 12),
            ("second", 15),
        ]

    def test_console_commands(self) -> None:
        block = Block(
            "doc.md",
            1,
            "console",
            "$ nc host 9000\nhello\nHELLO\n$ printf x\nx\n",
            directives=(("typed", "hello"),),
        )
        first, second = console_commands(block)
        assert (first.text, first.typed, first.expected) == (
            "nc host 9000",
            ["hello"],
            ["HELLO"],
        )
        assert (second.text, second.line, second.expected) == ("printf x", 5, ["x"])

    def test_console_typed_line_must_be_there(self) -> None:
        block = Block(
            "doc.md", 1, "console", "$ cat\nHI\n", directives=(("typed", "hi"),)
        )
        with pytest.raises(DocError, match="typed lines not found"):
            console_commands(block)

    def test_refusals(self) -> None:
        assert refusal("systemctl daemon-reload") == "needs systemd as PID 1"
        assert refusal("/opt/sockd/bin/pip install sockd") == "installs packages"
        assert refusal("make test PYTEST_ARGS='-m x'") == "runs this test suite"
        assert refusal("make bench BENCH_ARGS=--quick") == "takes minutes"
        assert "daemonizing" in (refusal("twistd --pidfile p sockd-echo") or "")
        for fine in (
            "make run",
            "make dist",
            "twistd -n sockd",
            "twistd --help",
            "nc -N 127.0.0.1 9000   # not systemctl",
        ):
            assert refusal(fine) is None, fine

    def test_a_marker_names_commands_by_their_first_words(self) -> None:
        assert covered_by("/opt/sockd/bin/pip install sockd", ["pip install"])
        assert covered_by("nc -u 127.0.0.1 8001", ["nc -u"])
        assert not covered_by("nc -N 127.0.0.1 8001", ["nc -u"])
        assert not covered_by("installer", ["install"])

    def test_rewrite_ports_hosts_and_paths(self, harness: Harness) -> None:
        harness.ports.update({9000: 40001, 8001: 40002, 8898: 40003, 7443: 40004})
        try:
            rewritten = harness.rewrite(
                "nc -N 127.0.0.1 9000; curl gopher://127.0.0.1:8898/; "
                "sockd chat 127.0.0.1; openssl s_client -connect echo.internal:7443 "
                "-CAfile /etc/sockd/tls/cert.pem"
            )
        finally:
            harness.ports.clear()
        assert rewritten == (
            "nc -N 127.0.0.1 40001; curl gopher://127.0.0.1:40003/; "
            "sockd chat 127.0.0.1:40002; openssl s_client -connect "
            f"127.0.0.1:40004 -CAfile {harness.sysroot}/etc/sockd/tls/cert.pem"
        )
        with pytest.raises(DocError, match="port 7007"):
            harness.rewrite("nc 127.0.0.1 7007")
        with pytest.raises(DocError, match=r"10\.0\.0\.1, another machine"):
            harness.rewrite("redis-cli -h 10.0.0.1")
        with pytest.raises(DocError, match="/etc/systemd/system/"):
            harness.rewrite("cp x /etc/systemd/system/")

    def test_default_ports_are_written_out(self) -> None:
        assert add_default_ports("sockd chat 127.0.0.1") == "sockd chat 127.0.0.1:8001"
        assert add_default_ports("sockd get -q 127.0.0.1 x") == (
            "sockd get -q 127.0.0.1:8898 x"
        )
        assert add_default_ports("curl gopher://127.0.0.1/") == (
            "curl gopher://127.0.0.1:70/"
        )
        assert add_default_ports("sockd echo 127.0.0.1:9000 hi") == (
            "sockd echo 127.0.0.1:9000 hi"
        )

    def test_a_started_daemon_gets_ephemeral_ports(self, harness: Harness) -> None:
        text, trigger = harness.serve_rewrite(
            "systemd-socket-activate -l 127.0.0.1:7007 -- systemd-socket-activate "
            "--datagram -l 127.0.0.1:7007 -- /opt/sockd/bin/twistd -n sockd-echo "
            "--listen tcp:7007:interface=127.0.0.1"
        )
        assert trigger is not None and trigger[1] != 7007
        assert text.count(f"-l 127.0.0.1:{trigger[1]}") == 2
        assert "--listen tcp:0:interface=127.0.0.1" in text
        assert f"-- {harness.mapped('/opt/sockd/bin')}/twistd -n" in text

    def test_output_comparison(self) -> None:
        compare(["ONE", "T...O"], "ONE\r\nTWO\r\n", "cmd")
        with pytest.raises(DocError, match="the docs show"):
            compare(["ONE"], "one\n", "cmd")

    def test_a_failing_command_fails(self, harness: Harness) -> None:
        with pytest.raises(DocError, match="exit status 3"):
            run(harness, "sh", "true\nexit 3\n")

    def test_shown_output_must_match(self, harness: Harness) -> None:
        run(harness, "console", "$ printf 'a\\nb\\n'\na\n...\n")
        with pytest.raises(DocError, match="it printed:\nhi"):
            run(harness, "console", "$ echo hi\nho\n")

    def test_typed_lines_are_typed(self, harness: Harness) -> None:
        # cat runs until interrupted, as an interactive client does.
        typed = (("typed", "hello"),)
        run(harness, "console", "$ cat\nhello\nhello\n", directives=typed)
        harness.timeout = 1.0
        try:
            with pytest.raises(DocError, match=r"nothing after 1\.0s"):
                run(harness, "console", "$ cat\nhello\nHELLO\n", directives=typed)
        finally:
            harness.timeout = docblocks.COMMAND_TIMEOUT

    def test_a_command_that_cannot_run_must_be_marked(self, harness: Harness) -> None:
        with pytest.raises(DocError, match=r"cannot run here \(needs systemd"):
            run(harness, "sh", "true\nsystemctl daemon-reload\n")
        # Marked as a whole: accepted, and nothing of it runs.
        run(
            harness,
            "sh",
            "systemctl daemon-reload\nfalse\n",
            not_run=NotRun("no systemd"),
        )
        # Only the commands named are left out.
        with pytest.raises(DocError, match="exit status 1"):
            run(
                harness,
                "sh",
                "systemctl daemon-reload\nfalse\n",
                not_run=NotRun("no systemd", ("systemctl",)),
            )

    def test_a_marker_must_name_a_command_of_its_block(self, harness: Harness) -> None:
        with pytest.raises(DocError, match="no command of the block starts with"):
            run(harness, "sh", "true\n", not_run=NotRun("why", ("socat",)))

    def test_the_venv_is_on_path_only_after_the_readme_activates_it(
        self, harness: Harness
    ) -> None:
        harness._activations = [30]
        try:
            harness.check(Block("README.md", 40, "sh", "sockd --help\n"))
            harness.check(Block("docs/deploy.md", 1, "sh", "sockd --help\n"))
            with pytest.raises(DocError, match="sockd: command not found"):
                harness.check(Block("README.md", 20, "sh", "sockd --help\n"))
        finally:
            harness._activations = None


class TestConfiguration:
    def test_merge_into_the_default(self) -> None:
        base = "[echo]\nlisten = a\n  b\nmode = line\n\n[chat]\nrate = 5\n"
        merged = merge_ini(base, "[echo]\nlisten = c\n[metrics]\nenabled = true\n")
        assert merged == (
            "[echo]\nmode = line\n\nlisten = c\n\n[chat]\nrate = 5\n"
            "[metrics]\nenabled = true\n\n"
        )

    def test_ephemeral(self) -> None:
        assert ephemeral("listen = tcp:9000:interface=127.0.0.1\nport = 9000\n") == (
            "listen = tcp:0:interface=127.0.0.1\nport = 9000\n"
        )

    def test_an_invalid_block_fails_naming_its_line(self, harness: Harness) -> None:
        run(harness, "ini", "[echo]\nidle_timeout = 10\n")
        with pytest.raises(DocError, match=r"doc.md, line 13: \[echo\] max_conn"):
            run(harness, "ini", "[echo]\nmode = line\nmax_connections = lots\n")

    def test_valid_alone_but_not_in_the_default_file(self, harness: Harness) -> None:
        # The default file enables the chat, which then needs an address.
        with pytest.raises(DocError, match=r"merged into sockd/data/sockd\.ini"):
            run(harness, "ini", "[chat]\nlisten =\n")

    def test_a_fragment_in_a_named_section(self, harness: Harness) -> None:
        run(harness, "ini", "idle_timeout = 30\n", directives=(("section", "echo"),))
        with pytest.raises(DocError, match="docs: section NAME"):
            run(harness, "ini", "idle_timeout = 30\n")

    def test_socket_activated_endpoints(self, harness: Harness) -> None:
        source = (
            "[echo]\nlisten = systemd:domain=INET:index=0\n"
            "listen_udp = systemd:domain=INET:index=1\n"
        )
        run(harness, "ini", source, directives=(("sockets", "sockd-echo.socket"),))
        with pytest.raises(DocError, match="docs: sockets UNIT"):
            run(harness, "ini", source)

    def test_drop_ins(self, harness: Harness) -> None:
        if shutil.which("systemd-analyze") is None:
            pytest.skip("systemd-analyze is not installed")
        unit = (("unit", "sockd-echo.service"),)
        run(harness, "systemd", "[Service]\nLimitNOFILE=1024\n", directives=unit)
        with pytest.raises(DocError, match="LimitNOFLIE"):
            run(harness, "systemd", "[Service]\nLimitNOFLIE=1024\n", directives=unit)
        with pytest.raises(DocError, match="docs: unit NAME"):
            run(harness, "systemd", "[Service]\nLimitNOFILE=1024\n")

    def test_output_of_a_command(self, harness: Harness) -> None:
        output = (("output of", "printf 'a -> b\\nc -> d\\n'"),)
        run(harness, "text", "c    -> d (a note)\na -> b\n", directives=output)
        with pytest.raises(DocError, match=r"only in its output: \['c -> d'\]"):
            run(harness, "text", "a -> b\n", directives=output)
