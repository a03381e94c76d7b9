"""
Deployment, with real processes on loopback: sd_notify readiness from a real
twistd, socket activation by C{systemd-socket-activate} (TCP and UDP), and a
classic daemonized start stopped through its pidfile.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    ROOT,
    TWISTD,
    Daemon,
    free_port_pair,
    socket_activation,
    tcp_exchange,
)

pytestmark = pytest.mark.integration

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    directory = tempfile.mkdtemp(prefix="sockd-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def message(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


class JournalDaemon(Daemon):
    """twistd as the units run it: the journal logger instead of a log file."""

    def command(self) -> list[str]:
        command = super().command()
        command.insert(command.index(self.tapname), "--logger")
        command.insert(command.index(self.tapname), "sockd.logs.journal_observer")
        return command


def test_ready_watchdog_and_stopping_from_real_twistd(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    ini = """
        [echo]
        listen = tcp:0:interface=127.0.0.1
        listen_udp = udp:0:interface=127.0.0.1
        """
    # INVOCATION_ID, as systemd sets it, switches to the journal logger.
    env = {
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "400000",
        "INVOCATION_ID": "5e0c6f1b4d2a4b7f9c3e8a1d2f4b6c8e",
    }
    daemon = Daemon("sockd-echo", ini, env=env)
    try:
        daemon.start()
        ready = message(sock)
        # READY=1 comes only once both listeners are bound, and says where.
        assert ready["READY"] == "1"
        tcp, udp = daemon.port("echo", "TCP"), daemon.port("echo", "UDP")
        assert ready["STATUS"] == (f"echo: TCP 127.0.0.1:{tcp}, UDP 127.0.0.1:{udp}")
        # Watchdog pings every 0.2 s, half of WATCHDOG_USEC.
        assert message(sock) == {"WATCHDOG": "1"}
        assert message(sock) == {"WATCHDOG": "1"}
        assert tcp_exchange(tcp, b"ready\n") == b"READY\n"
        # No timestamp of twistd's own: journald adds one.
        for line in daemon.lines:
            assert line.startswith(("[", "\t")), line
        # twistd re-raises the signal that stopped it; systemd counts SIGTERM
        # as a clean exit.
        assert daemon.stop() in (0, -signal.SIGTERM)
        # Pings may still be queued ahead of STOPPING=1.
        for _ in range(50):
            last = message(sock)
            if "STOPPING" in last:
                break
        assert last["STOPPING"] == "1"
    finally:
        daemon.stop()


def private_network() -> list[str]:
    """C{unshare --net}, where this machine permits it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run(
        [unshare, "--net", "true"], capture_output=True, timeout=10, check=False
    )
    return [unshare, "--net"] if probe.returncode == 0 else []


class ActivatedDaemon(JournalDaemon):
    """
    twistd under systemd-socket-activate, which binds the sockets and starts
    the daemon on the first connection.  One activator per socket type: the
    inner one passes the outer one's TCP socket on before its UDP socket,
    as a .socket unit with ListenStream= then ListenDatagram= would.
    """

    def __init__(self, port: int, ini: str) -> None:
        address = f"127.0.0.1:{port}"
        wrapper = socket_activation(
            [("stream", address), ("datagram", address)], "echo"
        )
        # As with PrivateNetwork=yes: a network namespace of its own, where
        # it could bind nothing that a client could reach.
        self.private_network = private_network()
        wrapper += self.private_network
        super().__init__("sockd-echo", ini, wrapper=wrapper)
        self.listen_port = port

    def launch(self) -> None:
        # The daemon starts on the first connection: wait for the tool only.
        super().launch()
        self.wait_for(f"Listening on 127.0.0.1:{self.listen_port} as 3")

    def activate(self) -> None:
        """Launch; the first connection starts the daemon, then is served."""
        self.launch()
        with socket.create_connection(("127.0.0.1", self.listen_port), timeout=10) as s:
            s.sendall(b"activated\n")
            self.wait_for(self.READY, 20)
            # The sample's echo is raw and unchanged, as inetd's.
            assert s.recv(100) == b"activated\n"


def test_socket_activation_tcp_and_udp() -> None:
    port = free_port_pair()
    # The shipped example: no port in it, the daemon binds nothing itself.
    ini = (ROOT / "etc" / "sockd-socket-activated.ini").read_text()
    daemon = ActivatedDaemon(port, ini)
    try:
        daemon.activate()
        assert daemon.ports[("echo", "TCP")] == [("127.0.0.1", port)]
        assert daemon.ports[("echo", "UDP")] == [("127.0.0.1", port)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(5)
            udp.bind(("127.0.0.1", 0))
            udp.sendto(b"datagram", ("127.0.0.1", port))
            assert udp.recvfrom(100) == (b"datagram", ("127.0.0.1", port))
        # TCP still served after a datagram: systemd passes blocking sockets,
        # and an adopted blocking UDP socket once hung the reactor here.
        assert tcp_exchange(port, b"again\n") == b"again\n", daemon.log()
        assert not re.search(r"Traceback|Unhandled", daemon.log())
        # As the units run it: --logger, no timestamps from twistd.
        assert not any(re.match(r"\d{4}-\d\d-\d\dT", line) for line in daemon.lines)
    finally:
        daemon.stop()


def test_socket_activation_with_workers() -> None:
    port = free_port_pair()
    ini = (ROOT / "etc" / "sockd-socket-activated.ini").read_text()
    daemon = ActivatedDaemon(port, ini + "\n[sockd]\nworkers = 2\n")
    try:
        daemon.activate()
        line = daemon.wait_for(r"sockd: worker 1 \(pid \d+\) serving echo TCP", 20)
        worker = int(re.search(r"pid (\d+)", line).group(1))  # type: ignore[union-attr]
        # The worker got systemd's sockets from the main process (its
        # parent): with the main process stopped, it alone answers.
        status = Path(f"/proc/{worker}/status").read_text()
        main = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        os.kill(main, signal.SIGSTOP)
        try:
            assert tcp_exchange(port, b"worker\n") == b"worker\n"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(5)
                udp.sendto(b"datagram", ("127.0.0.1", port))
                assert udp.recv(100) == b"datagram"
        finally:
            os.kill(main, signal.SIGCONT)
    finally:
        daemon.stop()


def test_socket_activation_without_sockets_fails_clearly() -> None:
    ini = """
        [echo]
        listen = systemd:domain=INET:index=0
        listen_udp =
        """
    daemon = Daemon("sockd-echo", ini)
    result = subprocess.run(
        daemon.command(),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=daemon.directory,
        check=False,
    )
    assert result.returncode != 0
    assert "systemd:domain=INET:index=0" in result.stdout + result.stderr


def privileged_port() -> int | None:
    for port in range(990, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


@pytest.fixture
def subreaper() -> Iterator[None]:
    """
    Become the parent of daemonized grandchildren (PR_SET_CHILD_SUBREAPER),
    so that their exit can be awaited and reaped here: a zombie left to a
    container's PID 1 still looks alive to twistd's pidfile check.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is not available")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait for a daemonized child (see L{subreaper}) to exit, and reap it."""
    fd = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if readable:
        os.waitpid(pid, 0)
    return bool(readable)


def start_daemonized(
    directory: Path, listen: str, user: pwd.struct_passwd | None = None
) -> tuple[int, int]:
    """C{twistd --pidfile --logfile sockd-echo}: (pid, bound port)."""
    config = directory / "sockd.ini"
    config.write_text(f"[echo]\nlisten = {listen}\nlisten_udp =\n")
    config.chmod(0o644)
    pidfile, logfile = directory / "twistd.pid", directory / "twistd.log"
    command = list(TWISTD)
    command += ["--pidfile", str(pidfile), "--logfile", str(logfile)]
    if user is not None:
        command += ["--uid", str(user.pw_uid), "--gid", str(user.pw_gid)]
    command += ["sockd-echo", "--config", str(config)]
    # The parent exits once the daemon has started (so it has bound).
    started = subprocess.run(
        command, capture_output=True, text=True, timeout=30, cwd=directory, check=False
    )
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int(pidfile.read_text())
    log = logfile.read_text()
    ports = re.findall(r"echo: listening on TCP 127\.0\.0\.1:(\d+)", log)
    assert ports, log
    return pid, int(ports[-1])


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the dropped user can reach, to remove the pidfile."""
    path = Path(tempfile.mkdtemp(prefix="sockd-daemon-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.usefixtures("subreaper")
def test_daemonized_start_drops_privileges_and_stops_by_pidfile(
    open_dir: Path,
) -> None:
    tmp_path = open_dir
    root = os.geteuid() == 0
    port = privileged_port() if root else None
    nobody = pwd.getpwnam("nobody") if root else None
    listen = f"tcp:{port or 0}:interface=127.0.0.1"
    pid, bound = start_daemonized(tmp_path, listen, nobody)
    try:
        if port:
            # Bound as root, then the uid dropped: nothing else could bind it.
            assert bound == port
        assert tcp_exchange(bound, b"daemon\n") == b"DAEMON\n"
        if nobody is not None:
            status = Path(f"/proc/{pid}/status").read_text()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
            assert uids and set(uids.group(1).split()) == {str(nobody.pw_uid)}
        os.kill(pid, signal.SIGTERM)
        assert wait_for_exit(pid, 15)
        pid = 0
        assert not (tmp_path / "twistd.pid").exists()
        assert "Server Shut Down" in (tmp_path / "twistd.log").read_text()
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.usefixtures("subreaper")
def test_restart_after_sigkill_rebinds_despite_stale_pidfile(tmp_path: Path) -> None:
    pid, port = start_daemonized(tmp_path, "tcp:0:interface=127.0.0.1")
    os.kill(pid, signal.SIGKILL)
    assert wait_for_exit(pid, 15)
    # The pidfile names a dead process now.
    assert int((tmp_path / "twistd.pid").read_text()) == pid
    listen = f"tcp:{port}:interface=127.0.0.1"
    second, rebound = start_daemonized(tmp_path, listen)
    try:
        assert second != pid and rebound == port
        assert "stale pidfile" in (tmp_path / "twistd.log").read_text().lower()
        assert tcp_exchange(port, b"back\n") == b"BACK\n"
        os.kill(second, signal.SIGTERM)
        assert wait_for_exit(second, 15)
        second = 0
    finally:
        if second:
            os.kill(second, signal.SIGKILL)
