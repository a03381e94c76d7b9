"""
File benchmark: C{twistd sockd-file} (bare requests: a path, the bytes, the
close) against nginx serving the same file over HTTP/1.0, both with
sendfile, one worker process each, driven by the C load generator's
download loop: one stream of a 1 GiB file (goal: at least 1.0x nginx) and
100 concurrent streams of a 10 MiB file (at least 1.0x), with sockd's peak
memory growth under 50 MiB.  The 1 GiB file is also fetched from sockd over
HTTP/1.0 on the same port (twisted.web's head, then sendfile), in the same
alternation: its row goes against the same nginx samples (goal: at least
0.9x).  nginx runs in both settings of tcp_nopush:
on (TCP_CORK, as people run it; the goals are against it) and off, and
sockd beside itself with its own TCP_CORK turned off ("sockd, no cork").

Then capped downloads: server CPU per MB of an 8 MiB download under
C{rate_limit = 2M}, under C{total_rate_limit = 2M}, and under C{rate_limit}
over TLS, each against the same download uncapped (goal: at most 1.5x).

    python -m bench.files [--quick] [--rounds N] [--seconds S]

The nginx rows are skipped, saying so, when nginx is not installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench import (
    BIN,
    Result,
    Server,
    alternate,
    build_tools,
    emit,
    paired_ratios,
    raise_nofile,
    sockd_daemon,
)

MIB = 1024 * 1024

#: (file name, size, concurrent streams, least ratio sockd/nginx wanted)
SCENARIOS = [
    ("one.bin", 1024 * MIB, 1, 1.0),
    ("ten.bin", 10 * MIB, 100, 1.0),
]
#: server memory growth allowed while serving them
RSS_GROWTH_MIB = 50
#: the two nginx contenders; goals are against the first
NGINX_ON, NGINX_OFF = "nginx, tcp_nopush on", "nginx, tcp_nopush off"
#: sockd's HTTP contender (the one-stream scenario only), and its goal
SOCKD_HTTP = "sockd, HTTP"
HTTP_GOAL = 0.9
#: sockd without TCP_CORK while a body streams (as before it had it)
NO_CORK = "sockd, no cork"
#: run in the daemon before twistd: never cork
NO_CORK_PRELUDE = "import sockd.files.sendfile as s\ns._CORK = None"

#: capped downloads: (scenario, [file] keys, over TLS); each against the
#: same download with no cap, on a daemon of its own
CAPPED = [
    ("rate_limit 2M", "rate_limit = 2M", False),
    ("total_rate_limit 2M", "total_rate_limit = 2M", False),
    ("rate_limit 2M, TLS", "rate_limit = 2M", True),
]
#: 3 s at 2 MiB/s after the first second's burst
CAPPED_SIZE = 8 * MIB
#: uncapped downloads per sample: one costs only a few ms of CPU
UNCAPPED_REPEAT = 10
#: most server CPU a capped download may cost, relative to an uncapped one
CAPPED_GOAL = 1.5

NGINX_CONF = """\
    daemon off;
    worker_processes 1;
    pid {dir}/nginx.pid;
    error_log stderr warn;
    events {{ worker_connections 4096; }}
    http {{
        access_log {dir}/access.log;
        sendfile on;
        tcp_nopush {nopush};
        client_body_temp_path {dir}/body;
        proxy_temp_path {dir}/proxy;
        fastcgi_temp_path {dir}/fastcgi;
        uwsgi_temp_path {dir}/uwsgi;
        scgi_temp_path {dir}/scgi;
        server {{
            listen 127.0.0.1:{port} backlog=4096;
            root {root};
        }}
    }}
"""


class Nginx(Server):
    """
    nginx on a free loopback port; ready once it accepts a connection.
    C{nopush}: C{tcp_nopush on} (TCP_CORK, as people run it) or off.
    """

    def __init__(self, root: Path, nopush: bool = True) -> None:
        directory = Path(tempfile.mkdtemp(prefix="sockd-bench-nginx-"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf = directory / "nginx.conf"
        conf.write_text(
            textwrap.dedent(NGINX_CONF).format(
                dir=directory, port=port, root=root, nopush="on" if nopush else "off"
            )
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        argv = [nginx, "-p", str(directory), "-c", str(conf), "-e", "stderr"]
        name = NGINX_ON if nopush else NGINX_OFF
        super().__init__(name, argv, r"^$", directory)
        self.ports["tcp"] = port

    def start(self, timeout: float = 15.0) -> Server:
        self.process = subprocess.Popen(
            self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.ports["tcp"]), 1).close()
                return self
            except OSError:
                time.sleep(0.05)  # nginx says nothing when ready: poll
        self.stop()
        raise RuntimeError("nginx did not start")

    def cpu(self) -> float:
        # The worker does the serving; the master, counted too, idles.
        total = 0.0
        for pid in [self.pid, *children(self.pid)]:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def make_root(scenarios: list[tuple[str, int, int, float]]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="sockd-bench-files-"))
    # nginx's worker runs as nobody.
    root.chmod(0o755)
    block = os.urandom(MIB)  # real data (a sparse file would flatter both)
    for name, size, _, _ in scenarios:
        with open(root / name, "wb") as out:
            for i in range(size // MIB):
                out.write(block[i % 251 :] + block[: i % 251])
        (root / name).chmod(0o644)
    return root


def memory_kib(pid: int, field: str) -> int:
    """C{VmRSS} (now) or C{VmHWM} (the peak so far) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"{field}:\s+(\d+) kB", status)
    return int(match.group(1)) if match else 0


def label(size: int, conns: int) -> str:
    amount = (
        f"{size // 1024 // MIB} GiB" if size >= 1024 * MIB else f"{size // MIB} MiB"
    )
    return f"{amount} file, {conns} stream{'s' if conns > 1 else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    opts = parser.parse_args()
    capped(opts.rounds or (1 if opts.quick else 3))
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        print("bench files: nginx is not installed (apt-get install nginx-light)")
        print("bench files: nginx rows skipped")
        return 0
    rounds = opts.rounds or (3 if opts.quick else 5)
    seconds = opts.seconds or (1.0 if opts.quick else 2.0)
    build_tools()
    raise_nofile()
    scenarios = SCENARIOS[:1] if opts.quick else SCENARIOS
    root = make_root(scenarios)
    ini = f"""\
        [file]
        listen = tcp:0:interface=127.0.0.1
        root = {root}
        max_connections = 1000
        max_connections_per_ip = 1000
    """
    sockd = sockd_daemon("sockd file", "sockd-file", ini).start()
    uncorked = sockd_daemon("sockd file, no cork", "sockd-file", ini, NO_CORK_PRELUDE)
    nginx = Nginx(root).start()
    nginx_off = Nginx(root, nopush=False)
    try:
        uncorked.start()
        nginx_off.start()
        for name, size, conns, goal in scenarios:
            cpu: dict[str, list[float]] = {}
            get = f"GET /{name} HTTP/1.0\\r\\n\\r\\n"
            bare = f"{name}\\n"
            requests = {sockd: bare, uncorked: bare, nginx: get, nginx_off: get}
            rss_before = memory_kib(sockd.pid, "VmRSS")

            per_cpu: dict[str, list[float]] = {}

            def run(
                who: str,
                server: Server,
                conns: int = conns,
                cpu: dict[str, list[float]] = cpu,
                requests: dict[Server, str] = requests,
                per_cpu: dict[str, list[float]] = per_cpu,
                request: str = "",
            ) -> float:
                before, started = server.cpu(), time.monotonic()
                asked = request or requests[server]
                values = loadgen_fetch(server, asked, conns, seconds)
                wall = time.monotonic() - started
                used = server.cpu() - before
                cpu.setdefault(who, []).append(used / wall)
                cpu.setdefault("loadgen", []).append(values.get("cpu", 0.0))
                rate = values["rate"] / 1e6
                per_cpu.setdefault(who, []).append(rate * wall / used if used else 0.0)
                return rate

            contenders = {
                "sockd": lambda: run("sockd", sockd),
                NGINX_ON: lambda: run(NGINX_ON, nginx),
                NGINX_OFF: lambda: run(NGINX_OFF, nginx_off),
                NO_CORK: lambda: run(NO_CORK, uncorked),
            }
            if conns == 1:
                contenders[SOCKD_HTTP] = lambda get=get: run(
                    SOCKD_HTTP, sockd, request=get
                )
            samples = alternate(rounds, contenders)
            over_http = samples.pop(SOCKD_HTTP, None)
            per_cpu.pop(SOCKD_HTTP, None)
            note = "CPU (cores, median): " + ", ".join(
                f"{k} {statistics.median(v):.2f}" for k, v in cpu.items()
            )
            growth = (memory_kib(sockd.pid, "VmHWM") - rss_before) / 1024
            verdict = "ok" if growth < RSS_GROWTH_MIB else "MISSED"
            note += (
                f"; sockd peak RSS growth {growth:.1f} MiB "
                f"(goal < {RSS_GROWTH_MIB} MiB: {verdict})"
            )

            emit(
                Result(
                    "files",
                    label(size, conns),
                    "MB/s",
                    samples,
                    paired_ratios(samples),
                    goals={NGINX_ON: goal},
                    note=note,
                )
            )
            if over_http is not None:
                http_samples = {**samples, "sockd": over_http}
                emit(
                    Result(
                        "files",
                        label(size, conns) + ", HTTP",
                        "MB/s",
                        http_samples,
                        paired_ratios(http_samples),
                        goals={NGINX_ON: HTTP_GOAL},
                        note="sockd over HTTP/1.0 on its file port (GET, "
                        "twisted.web head, sendfile body); nginx samples "
                        "shared with the row above",
                    )
                )
            emit(
                Result(
                    "files",
                    f"{label(size, conns)}, per server CPU-second",
                    "MB/CPU-s",
                    per_cpu,
                    paired_ratios(per_cpu),
                    note="MB / server CPU seconds (nginx: master and worker)",
                )
            )
    finally:
        sockd.stop()
        uncorked.stop()
        nginx.stop()
        nginx_off.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def capped(rounds: int) -> None:
    """Server CPU per MB of capped downloads against uncapped ones."""
    from sockd.client.cert import make_certificate

    root = Path(tempfile.mkdtemp(prefix="sockd-bench-capped-"))
    with open(root / "capped.bin", "wb") as out:
        out.write(os.urandom(CAPPED_SIZE))
    pem, key = make_certificate("localhost")
    (root / "cert.pem").write_bytes(pem)
    (root / "key.pem").write_bytes(key)
    try:
        for scenario, keys, tls in CAPPED:
            emit(capped_row(root, scenario, keys, tls, rounds))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def capped_row(root: Path, scenario: str, keys: str, tls: bool, rounds: int) -> Result:
    listen = (
        f"ssl:0:interface=127.0.0.1:privateKey={root}/key.pem:certKey={root}/cert.pem"
        if tls
        else "tcp:0:interface=127.0.0.1"
    )
    ini = f"[file]\nenabled = true\nlisten = {listen}\nroot = {root}\n"
    capped = sockd_daemon("sockd capped", "sockd-file", ini + keys + "\n")
    uncapped = sockd_daemon("sockd uncapped", "sockd-file", ini)
    capped.start()
    try:
        uncapped.start()
        try:
            samples = alternate(
                rounds,
                {
                    "sockd": lambda: cpu_per_mb(capped, tls, 1),
                    "uncapped": lambda: cpu_per_mb(uncapped, tls, UNCAPPED_REPEAT),
                },
            )
        finally:
            uncapped.stop()
    finally:
        capped.stop()
    return Result(
        "files",
        f"{CAPPED_SIZE // MIB} MiB download, {scenario}",
        "CPU ms/MB",
        samples,
        paired_ratios(samples),
        higher_is_better=False,
        goals={"uncapped": CAPPED_GOAL},
        note="server CPU (user + system, from schedstat) per MB downloaded, "
        "capped against the same download uncapped",
    )


def cpu_per_mb(server: Server, tls: bool, times: int) -> float:
    """Download the capped file C{times} times; the server's CPU ms per MB."""
    before = precise_cpu(server)
    port = server.ports["tcp"]
    received = sum(download(port, "capped.bin", tls) for _ in range(times))
    return (precise_cpu(server) - before) * 1000 / (received / 1e6)


def download(port: int, name: str, tls: bool) -> int:
    """A bare request; the byte count of the answer."""
    sock = socket.create_connection(("127.0.0.1", port), 30)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # our own throwaway certificate
        sock = context.wrap_socket(sock)
    with sock:
        sock.sendall(name.encode() + b"\n")
        received = 0
        while chunk := sock.recv(1024 * 1024):
            received += len(chunk)
    return received


def precise_cpu(server: Server) -> float:
    """
    CPU seconds of the server's processes, every thread, to the nanosecond
    (C{/proc/PID/task/TID/schedstat}): an uncapped download costs a few
    milliseconds, below the 10 ms resolution of L{Server.cpu}.
    """
    total = 0
    for pid in server.pids():
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
            except OSError:
                continue
            total += int(text.split()[0])
    return total / 1e9


def loadgen_fetch(
    server: Server, request: str, conns: int, seconds: float
) -> dict[str, float]:
    port = str(server.ports["tcp"])
    args = ["fetch", "127.0.0.1", port, str(conns), request, str(seconds), "0.5"]
    return loadgen_raw(args, seconds + 30)


def loadgen_raw(args: list[str], timeout: float) -> dict[str, float]:
    done = subprocess.run(
        [str(BIN / "loadgen"), *args], capture_output=True, text=True, timeout=timeout
    )
    values = dict(re.findall(r"(\w+)=(-?[\d.]+)", done.stdout))
    if "rate" not in values:
        raise RuntimeError(f"loadgen failed: {done.stdout} {done.stderr}")
    return {k: float(v) for k, v in values.items()}


if __name__ == "__main__":
    sys.exit(main())
