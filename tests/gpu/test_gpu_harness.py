"""The GPU harness end to end: naive passes and ranks; every adversarial kernel is rejected."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from avo.types import Problem, Shape, Status
from tests.conftest import adversarial_sources, open_gpu_harness

ROOT = Path(__file__).resolve().parents[2]
ADVERSARIAL = adversarial_sources()
NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()

pytestmark = pytest.mark.gpu


def _problem(heads_q: int, heads_kv: int, bench: tuple[Shape, ...] = ()) -> Problem:
    check = tuple(Shape(2, sq, sk, heads_q, heads_kv, 128, c)
                  for sq, sk in ((1, 1), (17, 17), (1000, 1000), (4097, 4097), (128, 300), (300, 128))
                  for c in (False, True))
    return Problem("test", heads_q, heads_kv, 128, bench, check)


MHA = _problem(4, 4, bench=(Shape(2, 2048, 2048, 16, 16, 128, False), Shape(2, 2048, 2048, 16, 16, 128, True)))
GQA = _problem(8, 2)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = open_gpu_harness(tmp_path_factory, timeout_s=45)
    yield h
    h.close()


def test_naive_passes_and_ranks(harness):
    r = harness.evaluate(NAIVE, MHA)
    assert r.status == Status.OK, r.error + r.log[-2000:]
    print(f"naive: {r.score:.2f} TFLOPS, compile {r.compile_s:.2f} s, verify {r.verify_s:.2f} s, "
          f"bench {r.bench_s:.2f} s")
    assert r.ranked and r.score and r.score > 0
    assert len(r.configs) == len(MHA.bench)
    for c in r.configs:
        assert c.tflops and c.ms and c.ms_p10 <= c.ms <= c.ms_p90 and c.max_err is not None
        assert c.cudnn_tflops and c.fa2_tflops  # both baselines timed on the same shapes
    assert r.gpu and r.registers and r.threads == 128 and r.compile_s > 0 and r.verify_s > 0 and r.bench_s > 0
    assert r.sm_clock_mhz and r.power_w


def test_check_mode_does_not_time(harness):
    r = harness.evaluate(NAIVE, GQA, mode="check")
    assert r.status == Status.OK, r.error
    assert not r.ranked and r.score is None and r.configs == [] and r.bench_s == 0


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_rejected(harness, name):
    source = ADVERSARIAL[name]
    expect = Status(re.search(r"^// expect: (\w+)", source, re.M)[1])
    problem = GQA if re.search(r"^// problem: gqa", source, re.M) else MHA
    full = re.search(r"^// mode: full", source, re.M)
    r = harness.evaluate(source, problem, mode=None if full else "check")
    print(f"{name}: {r.status.value}: {r.error}")
    assert r.status == expect, f"{name}: got {r.status.value}: {r.error}"
    if expect == Status.TIMEOUT:  # the GPU is usable again after a hard kill
        assert harness.evaluate(NAIVE, GQA, mode="check").status == Status.OK


def test_precompile_fills_the_cache(harness):
    from avo.contract import set_tunables

    variants = [set_tunables(NAIVE, {"ROWS_PER_BLOCK": str(n)}) for n in (2, 8)]
    assert all(r.status == Status.OK for r in harness.precompile(variants, MHA))
    r = harness.evaluate(variants[0], GQA, mode="check")
    assert r.status == Status.OK and "(cached)" in r.log + _worker_log(harness, variants[0])


def _worker_log(harness, source: str) -> str:
    import hashlib

    h = hashlib.sha256(source.encode()).hexdigest()[:16]
    return (harness.work_dir / f"{h}-check" / "worker.log").read_text()
