"""sm90 on the GPU: every valid (STAGES, PRODUCER_REGS, CONSUMER_REGS) combination finishes and is correct.

A register split outside the rules (tests/test_sm90_space.py) compiles without them and then hangs:
the consumers' setmaxnreg.inc waits for registers the producer never freed. The valid splits must
pass the check well inside a short hard timeout. 256 tiles (more than one per SM) and 8 key blocks
per tile make the K/V ring and its mbarrier parities wrap many times at both stage counts.
"""
from __future__ import annotations

import time

import pytest

from avo.contract import set_tunables
from avo.types import Problem, Shape, Status
from tests.conftest import open_gpu_harness
from tests.test_sm90_space import SRC, VALID

pytestmark = pytest.mark.gpu

MHA = Problem("sm90-space", 16, 16, 128, bench=(),
              check=(Shape(2, 1024, 1024, 16, 16, 128, False), Shape(1, 1000, 1000, 16, 16, 128, True)))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = open_gpu_harness(tmp_path_factory, timeout_s=30)
    yield h
    h.close()


@pytest.mark.parametrize("v", VALID, ids=lambda v: "-".join(v.values()))
def test_valid_register_and_stage_combination_runs_to_completion(harness, v):
    t0 = time.monotonic()
    r = harness.evaluate(set_tunables(SRC, v), MHA, mode="check")
    print(f"{v}: {r.status.value} in {time.monotonic() - t0:.1f} s")
    assert r.status == Status.OK, f"{v}: {r.status.value}: {r.error}\n{r.log[-1500:]}"
