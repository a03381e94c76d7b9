"""
Charts of the scaling rows: for each series (echo request/response, echo
pipelined, file downloads, chat relay), throughput and p99 latency against
load, sockd beside the references, as SVG.

Drawn with matplotlib (the C{bench} extra) from the results alone, so a
recorded results file redraws the same charts.  The output is deterministic
(fixed SVG ids, no date, text kept as text): rerunning on the same results
changes no byte.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import Result

__all__ = ["chart_name", "series_points", "write_charts"]

#: the two panels of a chart: metric, axis label, log scale
PANELS = [("throughput", "throughput", False), ("p99", "p99 latency", True)]


def chart_name(series: str) -> str:
    """The file a series' chart goes to: C{bench-echo-pipelined-128.svg}."""
    slug = re.sub(r"[^a-z0-9]+", "-", series.lower()).strip("-")
    return f"bench-{slug}.svg"


def series_points(
    results: Sequence[Result], series: str, metric: str
) -> tuple[str, dict[str, list[tuple[int, float, float, float]]]]:
    """
    The unit, and per contender the points (load, median, min, max) of one
    metric of one series, by increasing load; a point whose median is not a
    number (latency where nothing completed) is left out.
    """
    unit = ""
    points: dict[str, list[tuple[int, float, float, float]]] = {}
    for r in results:
        if r.series != series or r.metric != metric:
            continue
        unit = r.unit
        for name, values in r.samples.items():
            kept = [v for v in values if math.isfinite(v)]
            if values and math.isfinite(median := statistics.median(values)):
                point = (r.load, median, min(kept), max(kept))
                points.setdefault(name, []).append(point)
    for line in points.values():
        line.sort()
    return unit, points


def write_charts(results: Sequence[Result], directory: Path) -> list[Path]:
    """One SVG per series present in C{results}; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, NullFormatter

    series = list(dict.fromkeys(r.series for r in results if r.series))
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    style: dict[str, Any] = {
        "svg.hashsalt": "sockd-bench",
        "svg.fonttype": "none",
        "font.size": 9,
    }
    with matplotlib.rc_context(style):
        for name in series:
            figure = Figure(figsize=(9.0, 3.4), layout="constrained")
            axes = figure.subplots(1, len(PANELS))
            for ax, (metric, label, log) in zip(axes, PANELS, strict=True):
                unit, points = series_points(results, name, metric)
                for i, (who, line) in enumerate(points.items()):
                    loads = [p[0] for p in line]
                    medians = [p[1] for p in line]
                    below = [p[1] - p[2] for p in line]
                    above = [p[3] - p[1] for p in line]
                    ax.errorbar(
                        loads,
                        medians,
                        yerr=[below, above],
                        label=who,
                        marker="o",
                        markersize=3,
                        capsize=2,
                        linewidth=2.0 if who == "sockd" else 1.2,
                        color="black" if who == "sockd" else f"C{i}",
                    )
                ax.set_xscale("log")
                loads = sorted({p[0] for line in points.values() for p in line})
                ax.set_xticks(loads, [f"{x:,}" for x in loads])
                ax.xaxis.set_minor_formatter(NullFormatter())
                if log:
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(bottom=0)
                    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
                ax.set_xlabel("load (" + _load_noun(results, name) + ")")
                ax.set_ylabel(f"{label} ({unit})" if unit else label)
                ax.grid(True, which="major", alpha=0.3)
            axes[0].legend(fontsize=8)
            figure.suptitle(name)
            path = directory / chart_name(name)
            figure.savefig(path, format="svg", metadata={"Date": None})
            written.append(path)
    return written


def _load_noun(results: Sequence[Result], series: str) -> str:
    """What the x axis counts, from the scenario names: conns, members..."""
    ours = [r for r in results if r.series == series]
    if ours:
        top = max(ours, key=lambda r: r.load)
        match = re.search(rf"\b{top.load} ([a-z]+)", top.scenario)
        if match:
            return match.group(1)
    return "count"
