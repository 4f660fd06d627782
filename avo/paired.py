"""Paired speed comparison of a candidate with the incumbent, timed side by side.

In every timed iteration the candidate and the incumbent run on the same fresh inputs, in a
random order, on the same clocks; so each iteration gives one paired log ratio
d_i = ln(t_incumbent_i / t_candidate_i) (> 0: the candidate is faster), and clock drift, which
moves both, cancels. Per benchmark config the ratio is exp of Yuen's 10 % trimmed mean of the
d_i, with the winsorized standard error (a one-off spike on either side neither moves the
estimate nor inflates the error much); the geomean ratio over configs is exp of the mean of the
per-config means, its standard error combines the configs' (independent samples), and its
degrees of freedom follow Welch-Satterthwaite. Bounds are one-sided at level alpha each:
`lo` > 1 means significantly faster, `hi` < 1 significantly slower. Pure Python: the worker
(screen) and the search (commit rule) use the same functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

TRIM = 0.1


def t_quantile(p: float, df: float) -> float:
    """Student t quantile (Cornish-Fisher expansion; exact for df 1 and 2)."""
    if df <= 1:
        return math.tan(math.pi * (p - 0.5))
    if df <= 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def yuen(d: list[float], trim: float = TRIM) -> tuple[float, float, int]:
    """(trimmed mean, standard error, degrees of freedom) of paired differences (Yuen 1974)."""
    n = len(d)
    if n < 2:
        return (d[0] if d else 0.0), math.inf, 1
    xs = sorted(d)
    g = int(trim * n)
    h = n - 2 * g
    mean = sum(xs[g:n - g]) / h
    w = [min(max(x, xs[g]), xs[n - g - 1]) for x in xs]  # winsorized
    wm = sum(w) / n
    wvar = sum((x - wm) ** 2 for x in w) / (n - 1)
    return mean, math.sqrt(wvar) / ((1 - 2 * trim) * math.sqrt(n)) if g else math.sqrt(wvar / n), h - 1


@dataclass
class Ratio:
    """Candidate speed / reference speed, with one-sided bounds at level alpha each."""
    ratio: float
    lo: float
    hi: float
    n: int = 0


def _log_ratios(cand_ms: list[float], ref_ms: list[float]) -> list[float]:
    return [math.log(r / c) for c, r in zip(cand_ms, ref_ms, strict=True) if c > 0 and r > 0]


def _ratio(mean: float, se: float, df: float, alpha: float, n: int) -> Ratio:
    t = t_quantile(1 - alpha, df)
    return Ratio(math.exp(mean), math.exp(mean - t * se), math.exp(mean + t * se), n)


def geomean_ratio(pairs: list[tuple[list[float], list[float]]], alpha: float) -> tuple[Ratio, list[Ratio]]:
    """The geomean ratio over configs (each a pair of per-iteration times) and each config's."""
    diffs = [_log_ratios(cand, ref) for cand, ref in pairs]
    stats = [yuen(d) for d in diffs]
    per = [_ratio(*st, alpha, len(d)) for st, d in zip(stats, diffs, strict=True)]
    k = len(stats)
    if k == 0:
        return Ratio(1.0, 0.0, math.inf), []
    mean = sum(m for m, _, _ in stats) / k
    var = sum(se ** 2 for _, se, _ in stats) / k ** 2
    denom = sum((s ** 2 / k ** 2) ** 2 / max(df, 1) for _, s, df in stats)
    df = var ** 2 / denom if denom > 0 else 1e9  # Welch-Satterthwaite
    return _ratio(mean, math.sqrt(var), df, alpha, sum(len(d) for d in diffs)), per


def screen_out(ratio: Ratio, margin: float) -> bool:
    """The screen drops a candidate only when it is significantly slower by more than `margin`."""
    return ratio.hi < 1.0 - margin


def annotate(result, alpha: float) -> None:
    """Fill an EvalResult's paired fields from the same-run samples its configs carry."""
    from avo.types import geomean

    pairs = [(c.samples, c.incumbent_samples) for c in result.configs]
    if not result.configs or not all(cand and ref and len(cand) == len(ref) for cand, ref in pairs):
        return
    total, per = geomean_ratio(pairs, alpha)
    for c, r in zip(result.configs, per, strict=True):
        c.ratio, c.ratio_lo, c.ratio_hi = r.ratio, r.lo, r.hi
    result.paired_ratio, result.paired_lo, result.paired_hi = total.ratio, total.lo, total.hi
    result.incumbent_score = geomean([c.incumbent_tflops for c in result.configs])
    anchors = [(c.samples, c.anchor_samples) for c in result.configs]
    if all(cand and ref and len(cand) == len(ref) for cand, ref in anchors):
        a, _ = geomean_ratio(anchors, alpha)
        result.anchor_ratio, result.anchor_lo, result.anchor_hi = a.ratio, a.lo, a.hi
