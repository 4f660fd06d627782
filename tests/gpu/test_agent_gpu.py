"""The agent's harness tools on a real GPU: compile, test and benchmark results as the model reads them."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from avo.agent.knowledge import KnowledgeBase
from avo.agent.memory import Notes
from avo.agent.tools import Workbench
from avo.harness import HarnessBench
from avo.types import ConfigResult, Problem, Shape, StepContext, Version
from tests.conftest import open_gpu_harness

ROOT = Path(__file__).resolve().parents[2]
NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = open_gpu_harness(tmp_path_factory, timeout_s=120)
    yield h
    h.close()


def test_tools_report_what_the_gpu_harness_measured(harness, tmp_path):
    check = tuple(Shape(2, s, s, 4, 4, 128, c) for s in (17, 300) for c in (False, True))
    bench = tuple(Shape(2, 1024, 1024, 8, 8, 128, c) for c in (False, True))
    problem = Problem("mha", 4, 4, 128, bench, check)
    best = Version(0, "00000.00", NAIVE, 1.0, [ConfigResult(b.key, tflops=1.0) for b in bench], "seed")
    ctx = StepContext(1, 0, best, [best], [], problem, HarnessBench(harness, problem, best.reference("incumbent")),
                      tmp_path, random.Random(0), set())
    bench_ = Workbench(ctx, Notes(tmp_path), KnowledgeBase())
    line = next(ln for ln in NAIVE.splitlines() if "@tunable" in ln)
    assert bench_.call("edit", {"search": line, "replace": line.replace(" 4 ", " 8 ", 1)}).ok
    expected = {"compile": "registers=", "test": "test: ok (correctness on the check shapes)", "benchmark": "score: "}
    for tool, expect in expected.items():
        r = bench_.call(tool, {})
        print(r.text)
        assert r.ok and expect in r.text, r.text
    # timed side by side with the best version, as the search times it
    assert "config | TFLOPS | best (same run) | ratio | vs cuDNN" in r.text
    assert "x the best v0 timed side by side" in r.text
    assert bench_.compiled_ok == bench_.source == bench_.checked_ok
    broken = bench_.call("edit", {"search": "AVO_LAUNCH(", "replace": "AVO_LAUNCH_NOPE("})
    assert broken.ok
    r = bench_.call("test", {})
    assert not r.ok and "compile_error" in r.text and "AVO_LAUNCH_NOPE" in r.text
    assert bench_.checked_ok != bench_.source  # the fallback keeps the last copy that passed
