from avo.commit import decide
from avo.types import ConfigResult, EvalResult, Status, Version


def best(score, configs=()):
    return Version(3, "00003.00", "src", score, [ConfigResult(k, tflops=t) for k, t in configs])


def result(score, status=Status.OK, ranked=True, configs=()):
    return EvalResult(status, ranked=ranked, score=score, configs=[ConfigResult(k, tflops=t) for k, t in configs])


def test_failed_candidates_never_commit_whatever_their_score():
    for st in (Status.INCORRECT, Status.CRASHED, Status.TIMEOUT, Status.COMPILE_ERROR, Status.ERROR):
        assert decide(result(1e9, st), best(1.0)) == "failed"


def test_equal_score_commits_with_zero_epsilon_and_not_with_margin():
    assert decide(result(100.0), best(100.0)) == "committed"
    assert decide(result(100.0), best(100.0), epsilon=0.01) == "not_faster"
    assert decide(result(101.5), best(100.0), epsilon=0.01) == "committed"
    assert decide(result(99.99), best(100.0)) == "not_faster"


def test_per_config_floor_rejects_a_regression_hidden_by_the_mean():
    b = best(100.0, [("a", 100.0), ("b", 100.0)])
    r = result(110.0, configs=[("a", 150.0), ("b", 80.0)])
    assert decide(r, b) == "committed"
    assert decide(r, b, min_config_ratio=0.9) == "regression"
    assert decide(r, b, min_config_ratio=0.8) == "committed"


def test_unranked_results_are_never_committed():
    assert decide(result(None, ranked=False), best(None)) == "unranked"
    assert decide(result(5.0, ranked=False), best(1.0)) == "unranked"
