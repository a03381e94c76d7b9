"""The shipped systemd units: contents, C{systemd-analyze verify}, and score."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python.reflect import namedAny

import sockd.core.config as config
from sockd.core.config import SockdSettings
from sockd.core.service import descriptor_budget
from sockd.daemons import DAEMONS
from tests import helpers
from tests.helpers import ROOT

UNITS = ROOT / "etc" / "systemd"
SERVICES = {
    "sockd-echo": "sockd-echo",
    "sockd-chat": "sockd-chat",
    "sockd-file": "sockd-file",
    "sockd": "sockd",
}
#: what each socket unit passes, in order: (Listen directive, service, kind)
SOCKET_ORDER = {
    "sockd-echo": [("ListenStream", "echo"), ("ListenDatagram", "echo")],
    "sockd-chat": [("ListenDatagram", "chat")],
    "sockd-file": [("ListenStream", "file")],
    "sockd": [
        ("ListenStream", "echo"),
        ("ListenDatagram", "echo"),
        ("ListenDatagram", "chat"),
        ("ListenStream", "file"),
    ],
}
#: an exposure above this fails the test (`systemd-analyze security`: 0 to 10)
MAX_EXPOSURE = 2.0


def directives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section -> [(key, value)] in order; repeated keys are kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], [])
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"{path.name}: not a directive: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def last(section: list[tuple[str, str]], key: str) -> str | None:
    values = [v for k, v in section if k == key]
    return values[-1] if values else None


def test_every_unit_is_shipped() -> None:
    names = sorted(p.name for p in UNITS.iterdir())
    expected = sorted(
        [f"{n}.service" for n in SERVICES]
        + [f"{n}.socket" for n in SERVICES]
        + ["private-network.conf"]
    )
    assert names == expected


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_runs_twistd_in_the_foreground(name: str) -> None:
    service = directives(UNITS / f"{name}.service")["Service"]
    assert last(service, "Type") == "notify"
    assert last(service, "Restart") == "on-failure"
    command = (last(service, "ExecStart") or "").split()
    assert command[0].endswith("/twistd")
    assert "--nodaemon" in command and "--pidfile=" in command
    tap = command.index(SERVICES[name])
    assert command[tap + 1 :] == ["--config", "/etc/sockd/sockd.ini"]
    # twistd's own options come before the tap name.
    assert command.index("--nodaemon") < tap
    assert command.index("--logger") < tap
    # The logger named exists and builds an observer.
    observer = namedAny(command[command.index("--logger") + 1])()
    assert callable(observer)
    # SIGHUP reloads; stopping waits longer than the daemon's own grace.
    assert last(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    stop = re.fullmatch(r"(\d+)s", last(service, "TimeoutStopSec") or "")
    assert stop and int(stop.group(1)) > SockdSettings().shutdown_grace


def test_documentation_is_in_the_venv_the_units_run() -> None:
    """
    C{Documentation=} names the deploy guide the wheel installs beside the
    venv's C{bin/} (setup.cfg's data_files; tests/test_packaging.py checks an
    installed wheel), in the venv C{ExecStart=} runs twistd from.
    """
    for unit in sorted(UNITS.glob("*.s*")):
        (url,) = [v for k, v in directives(unit)["Unit"] if k == "Documentation"]
        assert url == "file:///opt/sockd/share/doc/sockd/deploy.md", unit.name
    for name in SERVICES:
        service = directives(UNITS / f"{name}.service")["Service"]
        command = last(service, "ExecStart") or ""
        assert command.startswith("/opt/sockd/bin/twistd "), name


def test_tapnames_exist() -> None:
    taps = {p.tapname for p in getPlugins(IServiceMaker)}  # type: ignore[attr-defined]
    assert set(SERVICES.values()) <= taps


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_hardening(name: str) -> None:
    service = directives(UNITS / f"{name}.service")["Service"]
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert last(service, key) == value, key
    # pyOpenSSL needs writable+executable memory: this would break ssl:.
    assert last(service, "MemoryDenyWriteExecute") in (None, "no")
    # Logs go to the journal, not to a file.
    assert last(service, "StandardOutput") == "journal"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_open_files_limit_fits_the_shipped_caps(name: str) -> None:
    """
    LimitNOFILE= sets soft and hard limits alike; the shipped INI's caps,
    with every service on, uploads allowed and the metrics page, fit in it
    (systemd's own soft default, 1024, does not hold them).
    """
    service = directives(UNITS / f"{name}.service")["Service"]
    limit = int(last(service, "LimitNOFILE") or "0")
    on = {"enabled": "true"}
    shipped = config.load(
        str(ROOT / "etc" / "sockd.ini"),
        {
            "file": {**on, "writable": "true", "upload_allow": "127.0.0.1"},
            "metrics": on,
        },
    )
    needed = sum(n for _, n in descriptor_budget(shipped, list(DAEMONS)))
    assert 1024 < needed <= limit


@pytest.mark.parametrize("name", ["sockd-file", "sockd"])
def test_file_root_is_bound_read_only(name: str) -> None:
    service = directives(UNITS / f"{name}.service")["Service"]
    assert last(service, "TemporaryFileSystem") == "/srv:ro"
    assert (last(service, "BindReadOnlyPaths") or "").lstrip("-") == (
        "/srv/sockd/files"
    )
    assert last(service, "ReadWritePaths") is None


@pytest.mark.parametrize("name", sorted(SOCKET_ORDER))
def test_socket_order_matches_documented_indexes(name: str) -> None:
    """The index each service's INI names is the position in the unit."""
    socket = directives(UNITS / f"{name}.socket")["Socket"]
    listens = [(k, v) for k, v in socket if k.startswith("Listen")]
    assert [k for k, _ in listens] == [k for k, _ in SOCKET_ORDER[name]]
    for _, address in listens:
        # Loopback by default, like the packaged INI.
        assert address.startswith("127.0.0.1:"), address
    text = (UNITS / f"{name}.socket").read_text()
    for index in range(len(SOCKET_ORDER[name])):
        assert f"systemd:domain=INET:index={index}" in text


def test_example_ini_uses_per_service_indexes() -> None:
    text = (ROOT / "etc" / "sockd-socket-activated.ini").read_text()
    active = [line for line in text.splitlines() if not line.startswith("#")]
    body = "\n".join(active)
    assert re.search(
        r"\[echo\]\s+enabled = true\s+listen = systemd:domain=INET:index=0"
        r"\s+listen_udp = systemd:domain=INET:index=1",
        body,
    )
    assert re.search(r"\[chat\][^\[]*listen = systemd:domain=INET:index=0", body)
    assert re.search(r"\[file\][^\[]*listen = systemd:domain=INET:index=0", body)


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


@pytest.fixture(scope="module")
def runnable_units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return helpers.runnable_units(tmp_path_factory.mktemp("units"))


def test_systemd_analyze_verify(runnable_units: Path) -> None:
    tool = analyze()
    units = sorted(str(p) for p in runnable_units.iterdir())
    # Works offline, without systemd as PID 1: it loads the files only.
    result = subprocess.run(
        [tool, "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown or misspelt keys are only warnings on stderr: none allowed.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_analyze_verify_notices_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive is reported."""
    tool = analyze()
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nProtectSytem=strict\n")
    result = subprocess.run(
        [tool, "verify", "--man=no", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "ProtectSytem" in result.stderr


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_security_exposure(name: str) -> None:
    tool = analyze()
    result = subprocess.run(
        [tool, "security", "--offline=true", str(UNITS / f"{name}.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze cannot rate unit files offline")
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_private_network_drop_in(name: str, tmp_path: Path) -> None:
    """With every socket passed in, the unit can go without a network."""
    tool = analyze()
    shutil.copy(UNITS / f"{name}.service", tmp_path)
    drop_ins = tmp_path / f"{name}.service.d"
    drop_ins.mkdir()
    shutil.copy(UNITS / "private-network.conf", drop_ins)
    service = directives(drop_ins / "private-network.conf")["Service"]
    assert last(service, "PrivateNetwork") == "yes"
    assert last(service, "RestrictAddressFamilies") == "AF_UNIX"
    result = subprocess.run(
        [tool, "security", "--offline=true", str(tmp_path / f"{name}.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    if match is None and "--offline" in result.stderr:
        pytest.skip("this systemd-analyze cannot rate unit files offline")
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 0.6, result.stdout
