"""
Regressions: compare the ratios sockd/reference of one run with a recorded
run's.

A ratio is compared where both runs have it: the same bench, scenario and
reference.  Each run's spread for that ratio is the range (max - min) of
its per-round ratios; the allowed change is the larger of the two runs'
spreads, and at least L{FLOOR} (1%) of the recorded ratio, which a ratio
of steady figures (memory) would otherwise not get.  A ratio I{fell} when
it moved the wrong way (down where higher is better, up where lower is
better, as for latency and memory) by more than that.  Ratios are
compared, not absolute figures: those move with the machine, the ratios of
alternating runs much less.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench import Result

__all__ = ["FLOOR", "Change", "compare", "ratio_and_spread", "report"]

#: the least change flagged, relative to the recorded ratio
FLOOR = 0.01


@dataclass(frozen=True)
class Change:
    """One ratio in both runs."""

    bench: str
    scenario: str
    reference: str
    old: float
    new: float
    spread: float
    higher_is_better: bool

    @property
    def worse_by(self) -> float:
        """How far the new ratio moved in the wrong direction (negative: better)."""
        moved = self.new - self.old
        return -moved if self.higher_is_better else moved

    @property
    def fell(self) -> bool:
        return self.worse_by > self.spread


def ratio_and_spread(result: Result, reference: str) -> tuple[float, float] | None:
    """
    The median ratio sockd/C{reference} and the range of the per-round
    ratios (0 when there is only the medians' ratio); None when the result
    has no usable ratio.
    """
    per_round = [r for r in result.ratios.get(reference, []) if math.isfinite(r)]
    if per_round:
        return statistics.median(per_round), max(per_round) - min(per_round)
    mine, theirs = result.samples.get("sockd"), result.samples.get(reference)
    if not mine or not theirs:
        return None
    below = statistics.median(theirs)
    if not below or not math.isfinite(ratio := statistics.median(mine) / below):
        return None
    return ratio, 0.0


def _references(result: Result) -> list[str]:
    names = [n for n in result.samples if n != "sockd"]
    return names + [n for n in result.ratios if n not in result.samples]


def compare(old: Sequence[Result], new: Sequence[Result]) -> list[Change]:
    """Every ratio present in both runs, in the new run's order."""
    recorded: dict[tuple[str, str, str], tuple[float, float]] = {}
    for result in old:
        for name in _references(result):
            found = ratio_and_spread(result, name)
            if found is not None:
                recorded[(result.bench, result.scenario, name)] = found
    changes: list[Change] = []
    for result in new:
        for name in _references(result):
            key = (result.bench, result.scenario, name)
            found = ratio_and_spread(result, name)
            if found is None or key not in recorded:
                continue
            (before, old_spread), (after, new_spread) = recorded[key], found
            changes.append(
                Change(
                    result.bench,
                    result.scenario,
                    name,
                    before,
                    after,
                    max(old_spread, new_spread, FLOOR * abs(before)),
                    result.higher_is_better,
                )
            )
    return changes


def report(changes: Sequence[Change]) -> list[str]:
    """One line per compared ratio, the ones that fell marked FELL."""
    lines = []
    for c in changes:
        verdict = "FELL" if c.fell else "ok"
        lines.append(
            f"{verdict:4}  {c.bench} / {c.scenario} / vs {c.reference}: "
            f"{c.old:.2f} -> {c.new:.2f} (spread {c.spread:.2f})"
        )
    return lines
