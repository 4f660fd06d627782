"""The profile tool on the real GPU: ncu runs the worker in the sandbox and its report becomes a summary."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from avo.agent.knowledge import KnowledgeBase
from avo.agent.memory import Notes
from avo.agent.tools import Workbench
from avo.harness import HarnessBench
from avo.harness.profile import ProfileError, find_ncu
from avo.types import Problem, Shape, StepContext, Version
from tests.conftest import open_gpu_harness

ROOT = Path(__file__).resolve().parents[2]
SM90 = (ROOT / "kernels_cuda" / "sm90" / "sm90.cu").read_text()
BENCH = (Shape(2, 4096, 4096, 16, 16, 128, False), Shape(2, 4096, 4096, 16, 16, 128, True))
PROBLEM = Problem("mha", 16, 16, 128, BENCH, BENCH)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = open_gpu_harness(tmp_path_factory, timeout_s=300)
    if find_ncu(h.cfg.profiler) is None:
        h.close()
        if os.environ.get("AVO_REQUIRE_NCU") == "1":
            pytest.fail("AVO_REQUIRE_NCU=1 but Nsight Compute (ncu) is not installed")
        pytest.skip("Nsight Compute (ncu) is not installed")
    yield h
    h.close()


def test_profile_tool_summarises_one_launch_of_the_working_copy(harness, tmp_path):
    v0 = Version(0, "00000.00", SM90, None, [], "seed")
    ctx = StepContext(1, 0, v0, [v0], [], PROBLEM, HarnessBench(harness, PROBLEM), tmp_path, random.Random(0), set())
    r = Workbench(ctx, Notes(tmp_path), KnowledgeBase(), output_chars=100_000).call(
        "profile", {"shape": BENCH[1].key})
    print(r.text)
    assert r.ok, r.text
    assert r.text.startswith(f"Nsight Compute profile of avo_attention on {BENCH[1].key}")
    for metric in ("Duration", "Registers Per Thread", "Achieved Occupancy", "Compute (SM) Throughput"):
        assert f"  {metric}: " in r.text
    assert "Warp stalls" in r.text
    job = next(harness.work_dir.glob("*-profile"))
    assert all((job / f).stat().st_size > 0 for f in ("profile.ncu-rep", "details.csv", "raw.csv"))


def test_a_kernel_that_does_not_compile_has_no_profile(harness):
    with pytest.raises(ProfileError, match="no profile: compile_error"):
        harness.profile(SM90 + "\nthis line is not C++;\n", PROBLEM)
