"""Issue 10's bars for the four-system benchmark, and the verdict on one run: pure functions of the max rates each
system held (base req/s at p99 <= 100 ms, no errors, <= 1% degraded) in each round.

- colocated >= 200 req/s;
- colocated >= 0.75 x the floor, in the same round;
- distributed >= 2 x naive, in the same round.

A ratio is taken within a round (systems measured side by side, minutes apart) because this machine's speed
drifts between runs. A system that held no step has a max rate below the lowest step, not zero, and is treated
so: against it, a ratio bar is met only if the other system's rate reaches the ratio times the lowest step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    """`system` holds at least `at_least` req/s; with `ref`, at least `at_least` times what `ref` holds."""

    system: str
    at_least: float
    ref: str | None = None

    def __str__(self) -> str:
        if self.ref is None:
            return f"{self.system} ≥ {self.at_least:g} req/s"
        return f"{self.system} ≥ {self.at_least:g}× {self.ref}"


BARS = (Bar("colocated", 200), Bar("colocated", 0.75, "floor"), Bar("distributed", 2.0, "naive"))


@dataclass(frozen=True)
class Outcome:
    bar: Bar
    met: bool | None  # None: a system the bar needs was not in the round
    detail: str


def check(bar: Bar, held: Mapping[str, float], lowest: float) -> Outcome:
    """One bar on one round: `held` maps each system run to its max rate held (0: it held no step), `lowest` is
    the lowest step offered (req/s)."""
    mine = held.get(bar.system)
    if mine is None or (bar.ref is not None and bar.ref not in held):
        missing = [s for s in (bar.system, bar.ref) if s is not None and s not in held]
        return Outcome(bar, None, f"not measured ({', '.join(missing)} not run)")
    if bar.ref is None:
        return Outcome(bar, mine >= bar.at_least, f"{bar.system} {mine:g}")
    ref = held[bar.ref]
    if ref > 0:
        ratio = mine / ref
        return Outcome(bar, ratio >= bar.at_least, f"{mine:g} / {ref:g} = {ratio:.2f}×")
    # The reference failed even the lowest step, so its true max is below `lowest`.
    met = mine >= bar.at_least * lowest
    sign = "≥" if met else "<"
    return Outcome(
        bar, met, f"{bar.ref} held no step (< {lowest:g}); {bar.system} {mine:g} {sign} {bar.at_least:g} × {lowest:g}"
    )


def verdicts(rounds: Mapping[int, Mapping[str, float]], lowest: float, bars: Sequence[Bar] = BARS) -> list[dict]:
    """Per bar: its outcome in each round, and how many of the rounds that measured it met it."""
    out = []
    for bar in bars:
        by_round = {k: check(bar, held, lowest) for k, held in sorted(rounds.items())}
        measured = [o for o in by_round.values() if o.met is not None]
        met = sum(bool(o.met) for o in measured)
        out.append(
            {
                "bar": str(bar),
                "rounds": {k: {"met": o.met, "detail": o.detail} for k, o in by_round.items()},
                "met_rounds": met,
                "measured_rounds": len(measured),
                # Met when every round that measured it met it: one lucky round of two is not a pass.
                "met": met == len(measured) if measured else None,
            }
        )
    return out


def _word(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def verdict_lines(results: list[dict]) -> list[str]:
    """Plain text for the console, one line a bar."""
    lines = []
    for v in results:
        rounds = "; ".join(f"round {k}: {_word(r['met'])} ({r['detail']})" for k, r in v["rounds"].items())
        lines.append(
            f"  {v['bar']}: {_word(v['met']).upper()}, {v['met_rounds']} of {v['measured_rounds']} rounds ({rounds})"
        )
    return lines


def verdict_markdown(results: list[dict]) -> str:
    """A markdown table: a row a bar, a column a round, and the verdict."""
    keys = sorted({k for v in results for k in v["rounds"]})
    rows = [
        "| bar | " + " | ".join(f"round {k}" for k in keys) + " | verdict |",
        "|---|" + "---|" * len(keys) + "---|",
    ]
    for v in results:
        cells = [f"{_word(v['rounds'][k]['met'])}: {v['rounds'][k]['detail']}" for k in keys]
        overall = f"**{_word(v['met'])}** ({v['met_rounds']} of {v['measured_rounds']} rounds)"
        rows.append(f"| {v['bar']} | " + " | ".join(cells) + f" | {overall} |")
    return "\n".join(rows)
