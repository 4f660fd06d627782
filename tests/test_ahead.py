"""Compiling ahead (avo.harness.ahead) with the real NVRTC, in the harness's own sandboxed worker processes."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from avo.harness import SandboxHarness
from avo.harness.ahead import COMPILED, NVRTC_S, Ahead
from avo.harness.nvrtc import compile_candidate
from avo.problem import problem_from_cfg
from avo.types import Status
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]
NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()
SM90 = (ROOT / "kernels_cuda" / "sm90" / "sm90.cu").read_text()
BROKEN = NAIVE.replace("extern \"C\"", "extern \"C\" int not_a_type x;", 1)


class Evaluating(SandboxHarness):
    """The sandbox harness whose full evaluation is the GPU worker's (mode evaluate), compiling ahead; on a machine
    without a GPU that worker reports the GPU unusable. Test double only for what it does not reach."""
    mode = "evaluate"


@pytest.fixture
def harness(tmp_path):
    pytest.importorskip("cuda.bindings")
    cfg = make_cfg("harness=compile", "kernel=mha")
    h = Evaluating(cfg.harness, tmp_path / "work")
    h.ahead = Ahead(h._precompile, 2)
    yield h, problem_from_cfg(cfg.kernel)
    h.ahead.close()


def test_a_compile_ahead_leaves_what_the_evaluations_compile_loads(harness):
    h, problem = harness
    h.ahead.start(NAIVE, problem)
    result, folder = h.ahead.take(NAIVE)
    assert result.status == Status.OK and result.registers and result.compile_s > 0
    assert folder.name == COMPILED
    assert float((folder / NVRTC_S).read_text()) == pytest.approx(result.compile_s, abs=1e-5)
    loaded = compile_candidate(NAIVE, h.arch, problem.head_dim, folder, max_local_bytes=1024)
    assert loaded.ok and loaded.cached and loaded.registers == result.registers and loaded.cubin
    # another source (or other options) misses the folder's key and compiles from the source
    other = compile_candidate(NAIVE + "\n// changed\n", h.arch, problem.head_dim, folder, max_local_bytes=1024)
    assert other.ok and not other.cached
    assert h.ahead.take(NAIVE) is None  # taken once


def test_a_failed_compile_ahead_answers_the_evaluation_without_a_gpu_worker(harness):
    h, problem = harness
    h.ahead.start(BROKEN, problem)
    r = h.evaluate(BROKEN, problem)
    assert r.status == Status.COMPILE_ERROR and "compile error" in r.error
    assert not list(h.work_dir.glob("*-evaluate*")), "a GPU worker started for a candidate that does not compile"


def test_the_gates_after_nvrtc_judge_what_was_loaded_and_printf_is_refused_ahead_as_in_an_evaluation(harness):
    h, problem = harness
    h.ahead.start(NAIVE, problem)
    _, folder = h.ahead.take(NAIVE)
    ptx = next(folder.glob("*.ptx"))
    body = ptx.read_text()
    at = body.index("ret;")
    ptx.write_text(body[:at] + "{ .reg .u64 t; mov.u64 t, %globaltimer; }\n" + body[at:])
    loaded = compile_candidate(NAIVE, h.arch, problem.head_dim, folder, max_local_bytes=1024)
    assert loaded.cached and not loaded.ok and "globaltimer" in loaded.error  # the PTX gate ran on the loaded PTX
    source = NAIVE.replace("{", '{ printf("x");', 1)
    h.ahead.start(source, problem)
    result, _ = h.ahead.take(source)
    assert result.status == Status.COMPILE_ERROR and "printf" in result.error


def test_a_forgotten_compile_leaves_nothing_and_closing_kills_the_ones_in_flight(harness):
    h, problem = harness
    h.ahead.start(NAIVE, problem)
    h.ahead.forget(NAIVE)
    h.ahead.start(SM90, problem)  # NVRTC takes about 10 s for it
    time.sleep(1.0)
    t0 = time.monotonic()
    h.ahead.close()
    assert time.monotonic() - t0 < 5.0, "close() waited for a compile instead of killing it"
    deadline = time.monotonic() + 10
    while list(h.work_dir.glob("*-precompile*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(h.work_dir.glob("*-precompile*")), "a compile's folder outlived its forget or the close"
