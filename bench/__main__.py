"""
C{make bench}: run every benchmark module present (echo, chat, files) and
print one table: per scenario, sockd's median [min-max], each reference's,
and the ratio sockd/reference (median of the per-round ratios).

    python -m bench [--quick] [--only echo,chat] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from bench import HERE, ROOT, Result, describe_machine, parse_result

#: benchmark modules, in order; each runs only if its file exists
MODULES = ["echo", "chat", "files"]


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
    if value == float("inf"):
        return "inf"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def spread(samples: list[float]) -> str:
    median = statistics.median(samples)
    return f"{fmt(median)} [{fmt(min(samples))}-{fmt(max(samples))}]"


def table(results: list[Result]) -> list[list[str]]:
    rows = [["bench", "scenario", "unit", "sockd", "vs", "reference", "ratio", "goal"]]
    for r in results:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--only", default="", help="comma-separated modules")
    parser.add_argument("--markdown", default="", help="also write the table here")
    parser.add_argument("--timeout", type=float, default=1800, help="per module")
    args = parser.parse_args()
    wanted = [m for m in args.only.split(",") if m] or MODULES

    machine = describe_machine()
    header = (
        f"{machine['cpus']} CPUs ({machine['cpu']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}, Twisted {machine['twisted']}"
    )
    print(f"bench: {header}", flush=True)
    results: list[Result] = []
    failures: list[str] = []
    for name in wanted:
        if not (HERE / f"{name}.py").exists():
            print(f"bench: no bench/{name}.py: skipped", flush=True)
            continue
        print(f"bench: running {name}", flush=True)
        found, status = run_module(name, args.quick, args.timeout)
        results += found
        if status:
            failures.append(f"{name} (exit {status})")

    rows = table(results)
    print()
    print(header)
    print(render(rows, markdown=False))
    for r in results:
        if r.note:
            print(f"  {r.bench} / {r.scenario}: {r.note}")
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(header + "\n\n" + render(rows, markdown=True) + "\n\n")
            for r in results:
                if r.note:
                    out.write(f"- {r.bench} / {r.scenario}: {r.note}\n")
    if failures:
        print("bench: failed: " + ", ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
