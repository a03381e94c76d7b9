"""
Run sockd's benchmarks and print one table: per scenario, sockd's median
[min-max], each reference's, and the ratio sockd/reference (the median of
the per-round ratios; contenders run alternately, A B C A B C ...).

  make bench                                   everything, about 20 minutes
  python -m bench --quick                      short runs, about 8 minutes
  python -m bench --only echo,scaling --markdown table.md
  python -m bench --compare docs/performance.json
  python -m bench --from bench/out/results.json --charts docs

Every run's results are kept in bench/out/results.json; --json FILE writes
them to FILE too (docs/performance.json is the recorded run).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import (
    HERE,
    METRICS,
    OUT,
    ROOT,
    Result,
    describe_machine,
    load_results,
    parse_result,
    save_results,
)

#: benchmark modules, in order; each runs only if its file exists
MODULES = ["echo", "chat", "files", "proxy", "scaling"]

EPILOG = """\
modules (--only, comma-separated):
  echo     TCP line echo (request/response and pipelined 128 at 1, 100 and
           1000 connections), raw echo, UDP echo, 10,000 idle connections:
           sockd-echo against stdlib asyncio, uvloop, uvloop with sockd's
           UDP checks, and C epoll
  chat     UDP chat relay to 1, 100 and 1000 members, memory per member:
           sockd-chat against an asyncio relay
  files    one 1 GiB download, 100 concurrent 10 MiB downloads: sockd-file
           against nginx (sendfile on; tcp_nopush on, and off)
  proxy    the PROXY protocol wrapper's cost: echo request/response and
           downloads through a haproxy: listener against the same daemon
           on a tcp: one
  scaling  throughput, p50 and p99 latency, server CPU per unit of work and
           server RSS as the load grows (echo: 1 to 10,000 connections;
           downloads: 1 to 1000 streams; chat: 10 to 10,000 members), sockd
           beside the best references; --charts draws these rows

units:
  lines/s, datagrams/s, MB/s   work done a second (MB = 10^6 bytes)
  .../CPU-s                    work per second of the server's CPU time
  ms                           latency (p50, p99)
  CPU-us/line, CPU-us/MB,      the server's CPU microseconds per unit of
  CPU-us/datagram              work
  MiB                          the server's resident memory (VmRSS)
  s, B                         idle connections: seconds until all are
                               accepted, memory growth per connection
  ratio                        sockd/reference; above 1 is better for sockd
                               for throughput, below 1 for time, latency,
                               CPU per unit and memory

exit status: 0 all ran; 1 a module failed; 2 bad arguments, or a results
file that cannot be read; 3 --compare found a ratio that fell by more than
the run-to-run spread (see bench/compare.py).
"""


def run_module(name: str, quick: bool, timeout: float) -> tuple[list[Result], int]:
    """Run C{python -m bench.NAME}, echoing its output; collect its results."""
    argv = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
    results: list[Result] = []
    process = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, errors="replace"
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        result = parse_result(line)
        if result is not None:
            results.append(result)
        else:
            print(f"  [{name}] {line.rstrip()}", flush=True)
        if time.monotonic() > deadline:
            print(f"bench: {name} ran past {timeout:.0f}s; stopped", file=sys.stderr)
            process.kill()
            break
    status = process.wait()
    return results, status


def fmt(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def spread(samples: list[float]) -> str:
    median = statistics.median(samples)
    return f"{fmt(median)} [{fmt(min(samples))}-{fmt(max(samples))}]"


def table(results: list[Result]) -> list[list[str]]:
    """The main table: every result but the scaling rows."""
    rows = [["bench", "scenario", "unit", "sockd", "vs", "reference", "ratio", "goal"]]
    for r in results:
        if r.series:
            continue
        first = True
        for name in r.samples:
            if name == "sockd":
                continue
            goal = ""
            if name in r.goals:
                sign = ">=" if r.higher_is_better else "<="
                met = r.goal_met(name)
                goal = f"{sign}{r.goals[name]:g}x {'ok' if met else 'MISSED'}"
            elif first and r.bound is not None:
                sign = ">=" if r.higher_is_better else "<="
                met = r.bound_met()
                goal = (
                    f"sockd {sign}{fmt(r.bound)} {r.unit} {'ok' if met else 'MISSED'}"
                )
            rows.append(
                [
                    r.bench if first else "",
                    r.scenario if first else "",
                    r.unit if first else "",
                    spread(r.samples["sockd"]) if first else "",
                    name,
                    spread(r.samples[name]),
                    f"{r.ratio(name):.2f}",
                    goal,
                ]
            )
            first = False
    return rows


def scaling_table(results: list[Result]) -> list[list[str]]:
    """
    The scaling rows, one line per load and contender: the median of each
    metric, and sockd's ratio to the contender for throughput and p99.
    """
    rows = [
        [
            "series",
            "load",
            "contender",
            "throughput",
            "p50",
            "p99",
            "server CPU",
            "RSS",
            "sockd/this (throughput, p99)",
        ]
    ]
    found: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        if r.series and r.metric in METRICS:
            found.setdefault((r.series, r.load), {})[r.metric] = r
    for (series, load), metrics in found.items():
        first = True
        names = next(iter(metrics.values())).samples
        for name in names:

            def cell(
                metric: str, name: str = name, metrics: dict[str, Result] = metrics
            ) -> str:
                r = metrics.get(metric)
                if r is None or not r.samples.get(name):
                    return ""
                return f"{fmt(statistics.median(r.samples[name]))} {r.unit}"

            ratios = ""
            if name != "sockd":
                parts = []
                for metric in ("throughput", "p99"):
                    r = metrics.get(metric)
                    kept = r.ratios.get(name) if r else None
                    parts.append(f"{statistics.median(kept):.2f}" if kept else "-")
                ratios = ", ".join(parts)
            rows.append(
                [
                    series if first else "",
                    str(load) if first else "",
                    name,
                    cell("throughput"),
                    cell("p50"),
                    cell("p99"),
                    cell("cpu"),
                    cell("rss"),
                    ratios,
                ]
            )
            first = False
    return rows


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |"]
        lines.append("|" + "|".join("---" for _ in rows[0]) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def modules(text: str) -> list[str]:
    """--only's value: module names, checked."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODULES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown module {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(MODULES)}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument(
        "--only",
        type=modules,
        default=MODULES,
        metavar="MODULES",
        help=f"comma-separated, from: {', '.join(MODULES)} (default: all)",
    )
    parser.add_argument(
        "--markdown", metavar="FILE", default="", help="also write the tables here"
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        default="",
        help="also write the results here (they always go to bench/out/results.json)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        default="",
        help="run nothing: take the results from FILE (a results JSON)",
    )
    parser.add_argument(
        "--compare",
        metavar="FILE",
        default="",
        help="compare the ratios with the run recorded in FILE; exit 3 if one fell",
    )
    parser.add_argument(
        "--charts",
        metavar="DIR",
        default="",
        help="draw the scaling rows as SVG charts into DIR (needs matplotlib)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per module (1800)"
    )
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace) -> tuple[list[Result], list[str], str]:
    """Run the wanted modules: their results, failures, and the machine line."""
    machine = describe_machine()
    header = (
        f"{machine['cpus']} CPUs ({machine['cpu']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}, Twisted {machine['twisted']}"
    )
    print(f"bench: {header}", flush=True)
    results: list[Result] = []
    failures: list[str] = []
    for name in args.only:
        if not (HERE / f"{name}.py").exists():
            print(f"bench: no bench/{name}.py: skipped", flush=True)
            continue
        print(f"bench: running {name}", flush=True)
        found, status = run_module(name, args.quick, args.timeout)
        results += found
        if status:
            failures.append(f"{name} (exit {status})")
    for path in [OUT / "results.json", *([Path(args.json)] if args.json else [])]:
        save_results(path, results, machine, args.quick)
        print(f"bench: results in {path}")
    return results, failures, header


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recorded = load_results(Path(args.compare)) if args.compare else None
        if args.source:
            results, failures = load_results(Path(args.source)), []
            header = f"results from {args.source}"
        else:
            results, failures, header = run_all(args)
    except (OSError, ValueError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2

    rows, scaled = table(results), scaling_table(results)
    print()
    print(header)
    if len(rows) > 1:
        print(render(rows, markdown=False))
    if len(scaled) > 1:
        print()
        print(render(scaled, markdown=False))
    for r in results:
        if r.note:
            print(f"  {r.bench} / {r.scenario}: {r.note}")
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(header + "\n\n")
            if len(rows) > 1:
                out.write(render(rows, markdown=True) + "\n\n")
            if len(scaled) > 1:
                out.write(render(scaled, markdown=True) + "\n\n")
            for r in results:
                if r.note:
                    out.write(f"- {r.bench} / {r.scenario}: {r.note}\n")
    if args.charts:
        try:
            from bench.charts import write_charts

            for path in write_charts(results, Path(args.charts)):
                print(f"bench: chart {path}")
        except ImportError as e:
            print(f"bench: no charts ({e}): pip install -e '.[bench]'", file=sys.stderr)
    status = 0
    if failures:
        print("bench: failed: " + ", ".join(failures), file=sys.stderr)
        status = 1
    if recorded is not None:
        from bench.compare import compare, report

        changes = compare(recorded, results)
        print()
        print(f"bench: ratios against {args.compare} ({len(changes)} compared)")
        for line in report(changes):
            print("  " + line)
        fell = [c for c in changes if c.fell]
        if fell:
            print(f"bench: {len(fell)} ratio(s) fell by more than the spread")
            status = status or 3
    return status


if __name__ == "__main__":
    sys.exit(main())
