"""In-memory tests of the benchmark harness's own logic (bench/)."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from bench import (
    RESULTS_FORMAT,
    Result,
    parse_loadgen,
    parse_result,
    percentile,
    read_results,
    results_document,
)
from bench.__main__ import main, modules, scaling_table, table
from bench.charts import chart_name, series_points
from bench.chat import probe, probe_sent
from bench.compare import Change, compare, ratio_and_spread, report
from bench.ref_udp_asyncio import CheckedEcho
from bench.scaling import chat_window, finite_ratios, measure
from sockd.echo.protocol import LOOP_PORTS
from tests.helpers import ROOT


def result(
    ratios: list[float],
    scenario: str = "line request/response, 100 conns",
    higher_is_better: bool = True,
    reference: str = "asyncio",
) -> Result:
    """A result whose per-round ratios sockd/C{reference} are C{ratios}."""
    return Result(
        "echo",
        scenario,
        "lines/s",
        {"sockd": [r * 100 for r in ratios], reference: [100.0] * len(ratios)},
        {reference: ratios},
        higher_is_better=higher_is_better,
    )


class ResultLineTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """A RESULT line gives back the result, scaling fields included."""
        sent = Result(
            "scaling",
            "echo request/response, 10 conns: p99 latency",
            "ms",
            {"sockd": [1.5, 2.0], "uvloop": [1.0, 1.0]},
            {"uvloop": [1.5, 2.0]},
            higher_is_better=False,
            series="echo request/response",
            load=10,
            metric="p99",
        )
        self.assertEqual(parse_result("RESULT " + json.dumps(asdict(sent))), sent)

    def test_other_lines(self) -> None:
        self.assertIsNone(parse_result("bench echo: line request/response ..."))

    def test_older_and_newer_fields(self) -> None:
        """Lines without the scaling fields parse; unknown keys are ignored."""
        line = {
            "bench": "files",
            "scenario": "1 GiB file, 1 stream",
            "unit": "MB/s",
            "samples": {"sockd": [1.0]},
            "from_the_future": 1,
        }
        parsed = parse_result("RESULT " + json.dumps(line))
        assert parsed is not None
        self.assertEqual((parsed.series, parsed.load, parsed.metric), ("", 0, ""))


class LoadgenOutputTests(SynchronousTestCase):
    def test_latency_fields(self) -> None:
        values = parse_loadgen(
            "rate=1000.5 answers=500 seconds=0.500 errors=0 cpu=0.31 "
            "connect_s=0.002 p50_us=12.5 p99_us=80.0 latencies=500\n"
        )
        self.assertEqual(values["rate"], 1000.5)
        self.assertEqual((values["p50_us"], values["p99_us"]), (12.5, 80.0))

    def test_failure_says_what_it_printed(self) -> None:
        with self.assertRaises(RuntimeError) as caught:
            parse_loadgen("", "connect: Connection refused")
        self.assertIn("Connection refused", str(caught.exception))


class ResultsFileTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        results = [result([1.0, 1.1]), result([0.5], scenario="udp")]
        document = results_document(results, {"cpus": 2}, quick=True)
        self.assertEqual(read_results(json.dumps(document)), results)

    def test_not_json(self) -> None:
        with self.assertRaises(ValueError) as caught:
            read_results("{", "old.json")
        self.assertIn("old.json: not JSON", str(caught.exception))

    def test_not_results(self) -> None:
        with self.assertRaises(ValueError) as caught:
            read_results('{"machine": {}}', "old.json")
        self.assertIn("no results list", str(caught.exception))

    def test_newer_format(self) -> None:
        text = json.dumps({"format": RESULTS_FORMAT + 1, "results": []})
        with self.assertRaises(ValueError) as caught:
            read_results(text, "new.json")
        self.assertIn("newer", str(caught.exception))

    def test_result_not_an_object(self) -> None:
        with self.assertRaises(ValueError) as caught:
            read_results('{"results": [1]}', "bad.json")
        self.assertIn("bad.json: a result is not an object", str(caught.exception))

    def test_result_lacking_a_field(self) -> None:
        with self.assertRaises(ValueError) as caught:
            read_results('{"results": [{"bench": "echo"}]}', "bad.json")
        self.assertIn("lacks a field", str(caught.exception))


class PercentileTests(SynchronousTestCase):
    def test_nearest_rank(self) -> None:
        values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
        self.assertEqual(percentile(values, 0.5), 50.0)
        self.assertEqual(percentile(values, 0.99), 99.0)
        self.assertEqual(percentile(values, 1.0), 100.0)
        self.assertEqual(percentile([7.0], 0.99), 7.0)

    def test_none(self) -> None:
        self.assertEqual(percentile([], 0.5), math.inf)


class CompareTests(SynchronousTestCase):
    def test_fall_beyond_spread(self) -> None:
        """Old 1.00 (spread 0.04), new 0.90 (spread 0.02): fell."""
        old = [result([0.98, 1.0, 1.02])]
        new = [result([0.89, 0.9, 0.91])]
        [change] = compare(old, new)
        self.assertAlmostEqual(change.old, 1.0)
        self.assertAlmostEqual(change.new, 0.9)
        self.assertAlmostEqual(change.spread, 0.04)
        self.assertTrue(change.fell)

    def test_fall_within_spread(self) -> None:
        """The larger of the two spreads (0.2, the new run's) allows it."""
        old = [result([0.99, 1.0, 1.01])]
        new = [result([0.8, 0.9, 1.0])]
        [change] = compare(old, new)
        self.assertAlmostEqual(change.spread, 0.2)
        self.assertFalse(change.fell)

    def test_floor(self) -> None:
        """With steady figures (no spread) a change under 1% is not flagged."""
        old = [result([2.0, 2.0])]
        [small] = compare(old, [result([1.99, 1.99])])
        self.assertAlmostEqual(small.spread, 0.02)
        self.assertFalse(small.fell)
        self.assertTrue(compare(old, [result([1.97, 1.97])])[0].fell)

    def test_rise_is_never_flagged(self) -> None:
        [change] = compare([result([1.0, 1.0])], [result([2.0, 2.0])])
        self.assertFalse(change.fell)
        self.assertLess(change.worse_by, 0)

    def test_lower_is_better(self) -> None:
        """For latency and memory a ratio that grew is the regression."""
        old = [result([1.0, 1.0], higher_is_better=False)]
        worse = [result([1.5, 1.5], higher_is_better=False)]
        better = [result([0.5, 0.5], higher_is_better=False)]
        self.assertTrue(compare(old, worse)[0].fell)
        self.assertFalse(compare(old, better)[0].fell)

    def test_only_ratios_in_both(self) -> None:
        old = [result([1.0]), result([1.0], scenario="udp")]
        new = [
            result([0.5], reference="uvloop"),
            result([0.5], scenario="raw"),
            result([0.5], scenario="udp"),
        ]
        changes = compare(old, new)
        self.assertEqual(
            [(c.scenario, c.reference) for c in changes], [("udp", "asyncio")]
        )

    def test_medians_when_no_per_round_ratios(self) -> None:
        """Without per-round ratios: the medians' ratio, with no spread."""
        bare = Result("chat", "x", "B", {"sockd": [600.0, 700.0], "asyncio": [500.0]})
        self.assertEqual(ratio_and_spread(bare, "asyncio"), (1.3, 0.0))
        self.assertIsNone(ratio_and_spread(bare, "uvloop"))

    def test_infinite_rounds_ignored(self) -> None:
        found = ratio_and_spread(result([1.0, math.inf, 1.5]), "asyncio")
        self.assertEqual(found, (1.25, 0.5))

    def test_report(self) -> None:
        lines = report(
            [
                Change("echo", "udp", "uvloop", 1.0, 0.8, 0.1, True),
                Change("echo", "raw", "C epoll", 1.0, 0.95, 0.1, True),
            ]
        )
        self.assertTrue(lines[0].startswith("FELL"))
        self.assertIn("echo / udp / vs uvloop: 1.00 -> 0.80 (spread 0.10)", lines[0])
        self.assertTrue(lines[1].startswith("ok"))


class MainTests(SynchronousTestCase):
    """C{python -m bench --from FILE --compare FILE}: no benchmark runs."""

    def write(self, directory: Path, name: str, results: list[Result]) -> str:
        path = directory / name
        path.write_text(json.dumps(results_document(results, {}, quick=False)))
        return str(path)

    def run_main(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = main(list(argv))
        return status, out.getvalue()

    def test_compare_exit_status(self) -> None:
        with tempfile.TemporaryDirectory() as name:
            directory = Path(name)
            recorded = self.write(directory, "old.json", [result([1.0, 1.0])])
            same = self.write(directory, "same.json", [result([0.99, 1.01])])
            fell = self.write(directory, "fell.json", [result([0.7, 0.8])])
            status, output = self.run_main("--from", same, "--compare", recorded)
            self.assertEqual(status, 0, output)
            self.assertIn("ok    echo / line request/response", output)
            status, output = self.run_main("--from", fell, "--compare", recorded)
            self.assertEqual(status, 3, output)
            self.assertIn("FELL  echo / line request/response", output)

    def test_unreadable_file(self) -> None:
        with tempfile.TemporaryDirectory() as name:
            status, output = self.run_main("--from", str(Path(name) / "none.json"))
        self.assertEqual(status, 2)
        self.assertIn("none.json", output)

    def test_only_is_checked(self) -> None:
        self.assertEqual(modules("echo, scaling"), ["echo", "scaling"])
        with self.assertRaises(Exception) as caught:
            modules("echo,nope")
        self.assertIn(
            "unknown module nope; choose from echo, chat", str(caught.exception)
        )


class ScalingTests(SynchronousTestCase):
    def test_finite_ratios(self) -> None:
        samples = {"sockd": [2.0, math.inf, 3.0, 4.0], "C": [1.0, 1.0, 0.0, 2.0]}
        self.assertEqual(finite_ratios(samples), {"C": [2.0, 2.0]})

    def test_measure(self) -> None:
        """One result per metric, contenders alternating, a value missing as inf."""
        order: list[str] = []

        def run(name: str, rate: float) -> dict[str, float]:
            order.append(name)
            return {"throughput": rate, "p50": 1.0, "p99": 2.0, "cpu": 3.0}

        results = measure(
            "echo pipelined 128",
            10,
            "conn",
            {
                "throughput": "lines/s",
                "p50": "ms",
                "p99": "ms",
                "cpu": "us",
                "rss": "MiB",
            },
            {"sockd": lambda: run("sockd", 200.0), "C": lambda: run("C", 100.0)},
            2,
        )
        self.assertEqual(order, ["sockd", "C", "sockd", "C"])
        self.assertEqual(
            [r.metric for r in results], ["throughput", "p50", "p99", "cpu", "rss"]
        )
        throughput, _, p99, _, rss = results
        self.assertEqual(
            throughput.scenario, "echo pipelined 128, 10 conns: throughput"
        )
        self.assertEqual(throughput.ratios, {"C": [2.0, 2.0]})
        self.assertFalse(p99.higher_is_better)
        self.assertEqual(rss.samples["sockd"], [math.inf, math.inf])
        self.assertEqual(rss.ratios, {"C": []})

    def test_table(self) -> None:
        results = measure(
            "chat relay",
            1,
            "member",
            {m: "u" for m in ("throughput", "p50", "p99", "cpu", "rss")},
            {
                "sockd": lambda: dict.fromkeys(
                    ("throughput", "p50", "p99", "cpu", "rss"), 2.0
                ),
                "asyncio": lambda: dict.fromkeys(
                    ("throughput", "p50", "p99", "cpu", "rss"), 1.0
                ),
            },
            1,
        )
        rows = scaling_table(results)
        self.assertEqual(rows[1][:4], ["chat relay", "1", "sockd", "2 u"])
        self.assertEqual(
            rows[2][2:], ["asyncio", "1 u", "1 u", "1 u", "1 u", "1 u", "2.00, 2.00"]
        )
        # The main table leaves the scaling rows out.
        self.assertEqual(len(table(results)), 1)

    def test_chat_window(self) -> None:
        self.assertEqual(
            [chat_window(n) for n in (10, 100, 1000, 10_000)], [8, 8, 2, 2]
        )


class ProbeTests(SynchronousTestCase):
    def test_relayed(self) -> None:
        """The send time survives the relay's C{<nick> } prefix."""
        sent = probe(12345.678901)
        self.assertEqual(len(sent), 48)
        self.assertEqual(probe_sent(b"<guest-1> " + sent), 12345.678901)

    def test_other_datagrams(self) -> None:
        self.assertIsNone(probe_sent(b"<guest-1> " + b"m" * 47 + b"\n"))
        self.assertIsNone(probe_sent(b"*** probe nonsense!\n"))


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


class CheckedEchoTests(SynchronousTestCase):
    """The uvloop reference's checks: those sockd's UDP echo makes."""

    def setUp(self) -> None:
        self.now = 0.0
        self.echo = CheckedEcho(2, 2, 3, 8, clock=lambda: self.now)
        self.transport = FakeTransport()
        self.echo.connection_made(self.transport)

    def test_same_ports_as_sockd(self) -> None:
        from bench.ref_udp_asyncio import LOOP_PORTS as REFERENCE_PORTS

        self.assertEqual(REFERENCE_PORTS, LOOP_PORTS)

    def test_answers_upper_cased(self) -> None:
        self.echo.datagram_received(b"hello", ("127.0.0.1", 5000))
        self.assertEqual(self.transport.sent, [(b"HELLO", ("127.0.0.1", 5000))])

    def test_drops(self) -> None:
        self.echo.datagram_received(b"x", ("127.0.0.1", 0))
        self.echo.datagram_received(b"x", ("127.0.0.1", 19))
        self.echo.datagram_received(b"123456789", ("127.0.0.1", 5000))  # > 8
        self.assertEqual((self.transport.sent, self.echo.dropped), ([], 3))

    def test_per_source_bucket(self) -> None:
        """Burst 2 per source; then 2 a second; another source unaffected."""
        for _ in range(3):
            self.echo.datagram_received(b"a", ("127.0.0.1", 5000))
        self.assertEqual(len(self.transport.sent), 2)
        self.echo.datagram_received(b"b", ("127.0.0.2", 5000))
        self.assertEqual(len(self.transport.sent), 3)
        self.now = 0.5  # one token back for 127.0.0.1
        self.echo.datagram_received(b"a", ("127.0.0.1", 5000))
        self.assertEqual(len(self.transport.sent), 4)

    def test_global_bucket(self) -> None:
        """Total rate 3: the fourth source is refused before any refill."""
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):
            self.echo.datagram_received(b"a", (host, 5000))
        self.assertEqual(len(self.transport.sent), 3)
        self.assertEqual(self.echo.dropped, 1)


class ChartTests(SynchronousTestCase):
    def results(self) -> list[Result]:
        units = {m: "u" for m in ("throughput", "p50", "p99", "cpu", "rss")}
        found: list[Result] = []
        for load in (1000, 10, 100):  # any order: points come out sorted
            found += measure(
                "echo request/response",
                load,
                "conn",
                units,
                {
                    "sockd": lambda load=load: {"throughput": load * 2.0, "p99": 1.0},
                    "C epoll": lambda load=load: {"throughput": load * 3.0},
                },
                2,
            )
        return found

    def test_names(self) -> None:
        self.assertEqual(
            chart_name("echo pipelined 128"), "bench-echo-pipelined-128.svg"
        )
        self.assertEqual(
            chart_name("file downloads, 1 MiB"), "bench-file-downloads-1-mib.svg"
        )

    def test_points(self) -> None:
        """Median, min and max by load; contenders without a value left out."""
        results = self.results()
        unit, points = series_points(results, "echo request/response", "throughput")
        self.assertEqual(unit, "u")
        self.assertEqual(
            points["sockd"],
            [(10, 20.0, 20.0, 20.0), (100, 200.0, 200.0, 200.0), (1000, 2e3, 2e3, 2e3)],
        )
        _, latency = series_points(results, "echo request/response", "p99")
        self.assertEqual(list(latency), ["sockd"])

    def test_svg_is_deterministic(self) -> None:
        """Drawing the same results twice gives the same bytes."""
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise SkipTest("matplotlib (the bench extra) is not installed")
        from bench.charts import write_charts

        drawn = []
        for _ in range(2):
            with tempfile.TemporaryDirectory() as name:
                [path] = write_charts(self.results(), Path(name))
                self.assertEqual(path.name, "bench-echo-request-response.svg")
                drawn.append(path.read_bytes())
        self.assertEqual(drawn[0], drawn[1])
        self.assertIn(b"<svg", drawn[0])
        self.assertIn(b"echo request/response", drawn[0])


class StandaloneTests(SynchronousTestCase):
    """The benchmarks run from a checkout without the test dependencies."""

    def test_no_module_imports_the_tests(self) -> None:
        for path in sorted((ROOT / "bench").glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    self.assertFalse(
                        name.split(".")[0] in ("tests", "pytest"),
                        f"{path.relative_to(ROOT)} imports {name}",
                    )

    def test_chat_federation_runs_without_pytest(self) -> None:
        blocked = (
            "import runpy, sys; sys.modules['pytest'] = None; "
            "sys.argv = ['chat_federation', '--help']; "
            "runpy.run_module('bench.chat_federation', run_name='__main__')"
        )
        result = subprocess.run(
            [sys.executable, "-c", blocked],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--members", result.stdout)
