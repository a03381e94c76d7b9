"""
Benchmarks: each sockd daemon against reference servers, side by side.

Every benchmark module (C{bench/echo.py}, C{bench/chat.py}, ...) runs as
C{python -m bench.NAME [--quick]} and prints, besides anything it likes, one
C{RESULT <json>} line per scenario (see L{Result} and L{emit}).
C{python -m bench} runs each module present, prints one table of them and
keeps them as JSON (L{save_results}), for L{bench.compare} and
L{bench.charts}.

Contenders in a scenario are run alternately (A B C A B C ...), each run
bounded to a few seconds, so that load from anything else on the machine
falls on all of them alike; a ratio is the median of the per-round ratios.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = HERE / "bin"
OUT = HERE / "out"
TICKS = os.sysconf("SC_CLK_TCK")

#: scaling metrics: name -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "throughput": ("throughput", True),
    "p50": ("p50 latency", False),
    "p99": ("p99 latency", False),
    "cpu": ("server CPU per unit", False),
    "rss": ("server RSS", False),
}


@dataclass
class Result:
    """
    One scenario: samples per contender ("sockd" first), in C{unit}.
    C{goals} maps a reference to the least (or, when C{higher_is_better} is
    false, the most) ratio sockd/reference wanted against it; C{bound} is
    an absolute goal for sockd's median (seconds, bytes per connection).
    """

    bench: str
    scenario: str
    unit: str
    samples: dict[str, list[float]]
    ratios: dict[str, list[float]] = field(default_factory=dict)
    higher_is_better: bool = True
    goals: dict[str, float] = field(default_factory=dict)
    note: str = ""
    bound: float | None = None
    #: scaling rows: the curve (C{"echo request/response"}), its x value
    #: (connections, streams or members) and what is measured (one of
    #: L{METRICS})
    series: str = ""
    load: int = 0
    metric: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """A result from L{asdict}'s form; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, name: str) -> float:
        if self.ratios.get(name):
            return statistics.median(self.ratios[name])
        return self.median("sockd") / self.median(name)

    def bound_met(self) -> bool | None:
        if self.bound is None:
            return None
        if self.higher_is_better:
            return self.median("sockd") >= self.bound
        return self.median("sockd") <= self.bound

    def goal_met(self, name: str) -> bool | None:
        if name not in self.goals:
            return None
        if self.higher_is_better:
            return self.ratio(name) >= self.goals[name]
        return self.ratio(name) <= self.goals[name]


def emit(result: Result) -> None:
    """Print a result for C{python -m bench} to collect."""
    print("RESULT " + json.dumps(asdict(result)), flush=True)


def parse_result(line: str) -> Result | None:
    """The result on a C{RESULT <json>} line; None for any other line."""
    if not line.startswith("RESULT "):
        return None
    return Result.from_dict(json.loads(line[len("RESULT ") :]))


#: version of the results file's layout
RESULTS_FORMAT = 1


def results_document(
    results: Sequence[Result], machine: dict[str, Any], quick: bool
) -> dict[str, Any]:
    """The JSON document L{save_results} writes."""
    return {
        "format": RESULTS_FORMAT,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": quick,
        "machine": machine,
        "results": [asdict(r) for r in results],
    }


def save_results(
    path: Path, results: Sequence[Result], machine: dict[str, Any], quick: bool
) -> None:
    """Write a run's results as JSON (atomically: never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results_document(results, machine, quick), indent=1)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n")
    partial.replace(path)


def read_results(text: str, origin: str = "results") -> list[Result]:
    """The results in a document L{save_results} wrote."""
    try:
        document = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{origin}: not JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise ValueError(f"{origin}: no results list (not a bench results file)")
    if document.get("format", RESULTS_FORMAT) > RESULTS_FORMAT:
        raise ValueError(
            f"{origin}: format {document['format']} is newer than this bench "
            f"reads ({RESULTS_FORMAT})"
        )
    if not all(isinstance(item, dict) for item in document["results"]):
        raise ValueError(f"{origin}: a result is not an object")
    try:
        return [Result.from_dict(item) for item in document["results"]]
    except TypeError as e:
        raise ValueError(f"{origin}: a result lacks a field: {e}") from None


def load_results(path: Path) -> list[Result]:
    """L{read_results} from a file."""
    return read_results(path.read_text(), str(path))


def paired_ratios(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    """sockd/reference for each round, where both have a sample."""
    mine = samples["sockd"]
    return {
        name: [a / b for a, b in zip(mine, theirs, strict=False) if b]
        for name, theirs in samples.items()
        if name != "sockd"
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The value at quantile C{q} (0-1, nearest rank); inf when there is none."""
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def raise_nofile() -> int:
    """Raise the descriptor limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- compiled tools -------------------------------------------------------


def build_tools() -> None:
    """Compile the C load generator and reference server when stale."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench: no C compiler (cc) found; apt-get install gcc")
    BIN.mkdir(exist_ok=True)
    for name in ("loadgen", "ref_echo_epoll"):
        source, binary = HERE / f"{name}.c", BIN / name
        if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
            continue
        subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(source)], check=True)


def loadgen(
    mode: str,
    port: int,
    conns: int,
    size: int = 64,
    depth: int = 1,
    seconds: float = 2.0,
    warmup: float = 0.5,
) -> dict[str, float]:
    """
    Run the load generator once; its key=value line as numbers: C{rate},
    C{answers}, C{errors}, C{cpu}, and for TCP C{p50_us} and C{p99_us}.
    """
    argv = [str(BIN / "loadgen"), mode, "127.0.0.1", str(port), str(conns)]
    argv += [str(size), str(depth), str(seconds), str(warmup)]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + warmup + 30
    )
    return parse_loadgen(done.stdout, done.stderr)


def parse_loadgen(stdout: str, stderr: str = "") -> dict[str, float]:
    """The load generator's C{key=value} line as numbers."""
    values = dict(re.findall(r"(\w+)=(-?[\d.]+)", stdout))
    if "rate" not in values:
        raise RuntimeError(f"loadgen failed: {stdout} {stderr}")
    return {k: float(v) for k, v in values.items()}


# --- servers --------------------------------------------------------------


class Server:
    """A server process that prints its ports, then serves until stopped."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ready: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready = re.compile(ready)
        self.cwd = cwd
        self.env = env
        self.ports: dict[str, int] = {}
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._changed = threading.Condition()

    def start(self, timeout: float = 30.0) -> Server:
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            cwd=self.cwd,
            env={**os.environ, **(self.env or {})},
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(self.ready.search(line) for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} did not start:\n" + "\n".join(self.lines[-20:])
                    )
                self._changed.wait(min(left, 0.5))
        return self

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            for kind, port in re.findall(r"\b(tcp|udp)=(\d+)", line):
                self.ports.setdefault(kind, int(port))
            match = re.search(r"listening on (TCP|UDP) [\d.]+:(\d+)", line)
            if match:
                self.ports.setdefault(match.group(1).lower(), int(match.group(2)))
            with self._changed:
                if len(self.lines) < 1000:
                    self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        """The server's process and its children (sockd's workers)."""
        found = [self.pid]
        for pid in found:
            with contextlib.suppress(OSError):
                path = f"/proc/{pid}/task/{pid}/children"
                found.extend(int(p) for p in Path(path).read_text().split())
        return found

    def _summed(self, read: Callable[[int], float]) -> float:
        """C{read(pid)} added up over L{pids}; a process gone meanwhile adds 0."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += read(pid)
        return total

    def rss(self) -> int:
        """Resident memory in bytes (VmRSS), summed over L{pids}."""

        def one(pid: int) -> int:
            text = Path(f"/proc/{pid}/status").read_text()
            match = re.search(r"VmRSS:\s+(\d+) kB", text)
            return int(match.group(1)) * 1024 if match else 0

        return int(self._summed(one))

    def cpu(self) -> float:
        """CPU seconds used so far (user + system), summed over L{pids}."""

        def one(pid: int) -> float:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / TICKS

        return self._summed(one)

    def open_fds(self) -> int:
        """Open descriptors, summed over L{pids}."""
        return int(self._summed(lambda pid: len(os.listdir(f"/proc/{pid}/fd"))))

    def peak_rss(self) -> PeakRss:
        """A context that samples L{rss} while it lasts; see L{PeakRss}."""
        return PeakRss(self)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class PeakRss:
    """
    Samples a server's resident memory every C{interval} seconds from a
    thread while the C{with} block runs; C{peak} is the largest seen.
    """

    def __init__(self, server: Server, interval: float = 0.1) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.server.rss())
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, self.server.rss())


def python_server(name: str, module: str, *args: str) -> Server:
    return Server(name, [sys.executable, "-m", module, *args], r"listening", ROOT)


def sockd_daemon(
    name: str,
    tapname: str,
    ini: str,
    prelude: str = "",
    services: int = 1,
    ready: str = r"sockd: ready",
) -> Server:
    """
    A real C{twistd -n TAPNAME} with C{ini} as its configuration.  C{prelude}
    is Python run in the daemon before twistd starts (a benchmark-only patch,
    such as turning eager writes off to measure them).
    """
    directory = Path(tempfile.mkdtemp(prefix="sockd-bench-"))
    config = directory / "sockd.ini"
    config.write_text(textwrap.dedent(ini))
    code = f"{prelude}\nfrom twisted.scripts.twistd import run\nrun()"
    argv = [sys.executable, "-c", code, "--nodaemon", "--pidfile=", "--logfile=-"]
    return Server(
        name,
        [*argv, tapname, "--config", str(config)],
        ready,
        directory,
    )


# --- running --------------------------------------------------------------


def alternate(
    rounds: int, contenders: dict[str, Callable[[], float]]
) -> dict[str, list[float]]:
    """Run each contender once per round, in turn; samples per contender."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            samples[name].append(run())
    return samples


def describe_machine() -> dict[str, Any]:
    import platform

    import twisted

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "kernel": platform.release(),
    }
