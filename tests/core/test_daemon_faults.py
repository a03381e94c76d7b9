"""
SECURITY.md, "Daemon": SIGKILL then restart, and a log destination that is
full.  Real twistd processes on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import TWISTD, tcp_exchange

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served(port: int, timeout: float = 20.0) -> bytes:
    """Retry until the daemon answers (it was started without a log to watch)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return tcp_exchange(port, b"ping\n", timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling a port that is not yet bound


def test_sigkill_then_restart(tmp_path: Path) -> None:
    port = free_port()
    ini = tmp_path / "sockd.ini"
    ini.write_text(f"[echo]\nlisten = tcp:{port}:interface=127.0.0.1\nlisten_udp =\n")
    pidfile = tmp_path / "twistd.pid"
    command = [
        *TWISTD,
        "--pidfile",
        str(pidfile),
        "--logfile",
        str(tmp_path / "twistd.log"),
        "sockd-echo",
        "--config",
        str(ini),
    ]
    subprocess.run(command, check=True, timeout=30, cwd=tmp_path)
    assert served(port) == b"PING\n"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for the kernel to reap a killed process
    assert pidfile.exists()  # stale: nobody removed it
    # twistd sees the pid is gone, replaces the stale pidfile, and rebinds.
    subprocess.run(command, check=True, timeout=30, cwd=tmp_path)
    try:
        assert served(port) == b"PING\n"
        assert int(pidfile.read_text()) != pid
    finally:
        new_pid = int(pidfile.read_text())
        os.kill(new_pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not pidfile.exists()


def test_log_destination_full(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is not available")
    port = free_port()
    ini = tmp_path / "sockd.ini"
    ini.write_text(f"[echo]\nlisten = tcp:{port}:interface=127.0.0.1\nlisten_udp =\n")
    process = subprocess.Popen(
        [
            *TWISTD,
            "-n",
            "--pidfile=",
            "--logfile",
            "/dev/full",
            "sockd-echo",
            "--config",
            str(ini),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        # Every log write fails with ENOSPC; connections (each one logs) are
        # still served.
        for _ in range(5):
            assert served(port) == b"PING\n"
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(15)
