"""The commit rule: correct, and faster than the incumbent (its island's head) when both are timed side by side.

A candidate is never judged against a score measured earlier: every ranked evaluation times it
interleaved with the incumbent (the best version now) on the same inputs and clocks, and
avo.paired turns the per-iteration pairs into a speed ratio with one-sided bounds at
`search.commit.alpha` each. Two rules:

- `gain` (the default): commit iff the geomean ratio is significantly above 1 + min_gain
  (lower bound > 1 + min_gain) and no config is significantly slower by more than config_margin.
  An A/A comparison (the incumbent against itself) commits with probability about alpha, so
  noise cannot ratchet the lineage, and every commit is a measured gain. This is the default
  because the search then only moves on evidence, and a week of commits adds up to a gain that a
  side-by-side re-timing confirms.
- `noninferior` (the AVO paper's "at least as good"): commit iff neither the geomean nor any
  config is significantly slower than the incumbent (by more than config_margin for a config),
  and the geomean is not significantly slower than the anchor: the last version committed as a
  significant gain (or the seed), timed in the same run too. Neutral moves that let the agent
  restructure a kernel are allowed, but a chain of them cannot drift the speed down.
"""
from __future__ import annotations

from avo.types import Decision, EvalResult, Version

RULES = ("gain", "noninferior")


def decide(result: EvalResult, rule: str = "gain", min_gain: float = 0.0, config_margin: float = 0.01) -> Decision:
    """Return the decision for an evaluated candidate; only COMMITTED advances the lineage."""
    if not result.ok:
        return Decision.FAILED
    if not result.ranked or result.score is None:
        return Decision.UNRANKED
    if result.stage == "screen":
        return Decision.SCREENED
    if result.paired_lo is None:
        return Decision.UNPAIRED
    slower = [c for c in result.configs if c.ratio_hi is not None and c.ratio_hi < 1.0 - config_margin]
    if rule == "gain":
        if result.paired_lo <= 1.0 + min_gain:
            return Decision.NOT_FASTER
        return Decision.REGRESSION if slower else Decision.COMMITTED
    if rule == "noninferior":
        if result.paired_hi < 1.0 or (result.anchor_hi is not None and result.anchor_hi < 1.0):
            return Decision.NOT_FASTER
        return Decision.REGRESSION if slower else Decision.COMMITTED
    raise ValueError(f"search.commit.rule={rule!r}: use one of {', '.join(RULES)}")


def anchor(history: list[Version]) -> Version | None:
    """The last version committed as a significant gain (the seed counts as one)."""
    return next((v for v in reversed(history) if v.gain), history[0] if history else None)
