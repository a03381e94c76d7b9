"""The C{sockd} command itself (sockd.client.main): version, help, dispatch."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import sockd
from sockd.client.main import SUBCOMMANDS, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sockd {sockd.__version__}\n"
    # What pip installed says the same.
    assert importlib.metadata.version("sockd") == sockd.__version__


def test_version_from_the_installed_command() -> None:
    command = Path(sys.executable).with_name("sockd")
    if not command.exists():
        pytest.skip("no sockd console script beside this interpreter")
    result = subprocess.run(
        [str(command), "--version"], capture_output=True, timeout=30, check=False
    )
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == f"sockd {sockd.__version__}\n".encode()


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sockd {name} ")
    assert SUBCOMMANDS[name][1] in " ".join(out.split())


def test_top_level_help_lists_every_subcommand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--version" in out
    for name in SUBCOMMANDS:
        assert name in out


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
