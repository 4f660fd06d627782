"""The commit rules on paired samples (avo.paired, avo.commit): pure logic, simulated timings."""
import math
import random

import pytest

from avo.commit import anchor, decide
from avo.paired import annotate, geomean_ratio, t_quantile, yuen
from avo.types import ConfigResult, EvalResult, Status, Version

KEYS = ["full_4k", "causal_4k", "full_8k", "causal_8k"]


def timed(speedups: dict[str, float] | float = 1.0, noise: float = 0.004, n: int = 10, seed: int = 0,
          anchor_speedup: float | None = None) -> EvalResult:
    """A ranked result whose configs carry paired samples: candidate time = incumbent time / speedup,
    both under the same per-iteration drift and independent noise."""
    rng = random.Random(seed)
    configs = []
    for j, key in enumerate(KEYS):
        s = speedups if isinstance(speedups, float) else speedups.get(key, 1.0)
        base = 1.0 + j
        drift = [1 + 0.03 * math.sin(i + j) for i in range(n)]
        inc = [base * dr * (1 + rng.gauss(0, noise)) for dr in drift]
        cand = [base / s * dr * (1 + rng.gauss(0, noise)) for dr in drift]
        c = ConfigResult(key, tflops=1 / (base / s), samples=cand, incumbent_samples=inc, incumbent_tflops=1 / base)
        if anchor_speedup is not None:
            c.anchor_samples = [x * anchor_speedup for x in cand]  # the anchor ran anchor_speedup times slower
        configs.append(c)
    r = EvalResult(Status.OK, ranked=True, score=1.0, configs=configs, stage="bench")
    annotate(r, 0.01)
    return r


def test_t_quantiles_match_tables():
    for p, df, want in ((0.975, 5, 2.571), (0.99, 9, 2.821), (0.95, 30, 1.697), (0.975, 1, 12.706)):
        assert abs(t_quantile(p, df) - want) < 2e-3


def test_yuen_ignores_one_spike():
    d = [0.0] * 9 + [0.5]
    mean, se, df = yuen(d)
    assert mean == 0.0 and df == 7


def test_failed_and_unranked_never_commit():
    for st in (Status.INCORRECT, Status.CRASHED, Status.TIMEOUT, Status.COMPILE_ERROR, Status.ERROR):
        r = timed(1.2)
        r.status = st
        assert decide(r) == "failed"
    r = timed(1.2)
    r.ranked = False
    assert decide(r) == "unranked"


def test_gain_rule_rejects_a_a_and_commits_a_real_gain():
    assert [decide(timed(1.0, seed=s)) for s in range(40)].count("committed") <= 2  # about alpha
    assert all(decide(timed(1.02, seed=s)) == "committed" for s in range(20))
    assert decide(timed(0.97)) == "not_faster"


def test_gain_rule_flags_a_config_regression_hidden_by_the_geomean():
    r = timed({"full_4k": 1.10, "causal_4k": 1.10, "full_8k": 1.10, "causal_8k": 0.95})
    assert r.paired_lo > 1 and decide(r) == "regression"
    assert decide(r, config_margin=0.06) == "committed"


def test_min_gain_demands_more_than_significance():
    r = timed(1.01)
    assert decide(r) == "committed" and decide(r, min_gain=0.02) == "not_faster"


def test_noninferior_allows_neutral_moves_but_not_drift_below_the_anchor():
    assert decide(timed(1.0), "noninferior") == "committed"
    assert decide(timed(0.97), "noninferior") == "not_faster"
    # as fast as the incumbent, but the incumbent had drifted 3 % below the anchor
    assert decide(timed(1.0, anchor_speedup=0.97), "noninferior") == "not_faster"


def test_screened_and_unpaired_results():
    r = timed(0.5)
    r.stage = "screen"
    assert decide(r) == "screened"
    r = EvalResult(Status.OK, ranked=True, score=1.0, configs=[ConfigResult("a", tflops=1.0)])
    assert decide(r) == "unpaired"
    with pytest.raises(ValueError, match="gain, noninferior"):
        decide(timed(1.1), "score")


def test_ratio_and_bounds_are_recorded_per_config():
    r = timed(1.05)
    assert 1.03 < r.paired_ratio < 1.07 and r.paired_lo < r.paired_ratio < r.paired_hi
    assert all(c.ratio_lo < c.ratio < c.ratio_hi for c in r.configs)
    assert abs(r.incumbent_score - math.exp(sum(math.log(1 / (1 + j)) for j in range(4)) / 4)) < 1e-9
    total, per = geomean_ratio([(c.samples, c.incumbent_samples) for c in r.configs], 0.01)
    assert total.ratio == r.paired_ratio and len(per) == 4


def test_anchor_is_the_last_significant_gain():
    vs = [Version(i, f"{i}", "", 1.0, [], gain=g) for i, g in enumerate([True, True, False, False])]
    assert anchor(vs).version == 1
    assert anchor([]) is None


def test_the_commit_rules_slow_variant_slows_the_landed_sm90_once_and_refuses_a_kernel_without_the_statement():
    """benchmarks/commit_rule.py puts its dependent FMAs after the steady-state softmax call, whatever its template
    arguments and scale (the sm90 seed spells it `softmax_step<false, BN>(..., p.softmax_scale_log2)`); without one
    it says so."""
    import pytest

    from avo.seeds import resolve
    from tests.conftest import benchmark_module

    cr = benchmark_module("commit_rule")
    src = resolve("sm90").source
    slow = cr.slowed(src, 40)
    assert slow.count("for (int r = 0; r < 40; ++r)") == 1 and len(slow) > len(src)
    at = slow.index("softmax_step<false, BN>(s, m, l, corr, p.softmax_scale_log2);")
    assert slow.index("for (int r = 0; r < 40; ++r)") > at
    with pytest.raises(SystemExit, match="no `softmax_step"):
        cr.slowed(src.replace("softmax_step<false", "softmax_later<false"), 40)
