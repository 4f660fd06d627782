"""The commit rule: correct, and at least as good as the best committed version."""
from __future__ import annotations

from avo.types import EvalResult, Version


def decide(result: EvalResult, best: Version, epsilon: float = 0.0, min_config_ratio: float = 0.0) -> str:
    """Return the decision for an evaluated candidate; only "committed" advances the lineage.

    epsilon: the score must reach best * (1 + epsilon) (a significance margin; 0 = "at least as high").
    min_config_ratio: every benchmark config must keep at least this fraction of the best's TFLOPS.
    """
    if not result.ok:
        return "failed"
    if not result.ranked or result.score is None or best.score is None:
        return "unranked"
    if result.score < best.score * (1.0 + epsilon):
        return "not_faster"
    if min_config_ratio > 0:
        ref = {c.key: c.tflops for c in best.configs if c.tflops}
        for c in result.configs:
            if c.key in ref and (c.tflops or 0.0) < min_config_ratio * ref[c.key]:
                return "regression"
    return "committed"
