"""The timed stages' checks (avo.harness.benchmark) on the CPU: every launch held to the incumbent's output
on the same inputs, the FP32 re-check drawn from all launches, other kernels' outputs out of reach while
one runs, a wall-clock suspicion measured again before any verdict. The kernels are torch stand-ins and
the timer a stand-in that runs the real protocol's calls in its order (test doubles, for the stage's
logic); the GPU suite runs the real ones (tests/gpu)."""
from __future__ import annotations

import random

import pytest
import torch

from avo.harness import benchmark as bm
from avo.harness.reference import attention_refs
from avo.harness.timing import Stats
from avo.types import Shape, Status

SHAPE = Shape(1, 96, 96, 2, 2, 64, False)
HC = {"err_mult": 2.0, "atol": 1e-4, "warmup": 1, "iters": 3, "bench_budget_s": 1.0, "flush_l2": False,
      "roofline_tflops": 1e9}


class Timer:
    """The timing protocol's order of calls (before, each function with its prep and post, after; plan before
    the first checks), without CUDA events: every function takes 1 ms, its wall-clock time `walls(name)`."""

    def __init__(self, launches: int = 5, walls=lambda name, i: 1.0):
        self.launches, self.walls, self.remeasured = launches, walls, 0

    def interleaved(self, fns, warmup, iters, budget_s, rng, prep=None, post=None, before=None, after=None, plan=None,
                    min_iters=2, wall=frozenset()):
        names = list(fns)
        plan(self.launches)
        for i in range(self.launches):
            before(i)
            for n in rng.sample(names, len(names)):
                prep.get(n, lambda: None)()
                fns[n]()
                post.get(n, lambda: None)()
            after(i)
        timed = self.launches - 1
        return {n: Stats.of([1.0] * timed, (self.walls(n, 0), 1.0) if n in wall else None) for n in names}

    def wall_times(self, fn, prep=None, post=None, repeats=1):
        out = []
        for _ in range(repeats):
            self.remeasured += 1
            if prep:
                prep()
            fn()
            out.append((self.walls("again", self.remeasured), 1.0))
        return out


class Attention:
    """A kernel's stand-in: exact attention; `wrong(launch, o)` may spoil its output; `peek` sees the stage."""

    def __init__(self, wrong=lambda n, o: None, peek=None):
        self.wrong, self.peek, self.launches = wrong, peek, 0

    def __call__(self, q, k, v, o, lse, causal, scale):
        self.launches += 1
        ref, ref_lse, _, _ = attention_refs(q, k, v, causal, scale)
        o.copy_(ref.bfloat16())
        lse.copy_(ref_lse)
        self.wrong(self.launches, o)
        if self.peek:
            self.peek(o, lse)

    def guards_broken(self):
        return torch.tensor(False)

    def module_changed(self):
        return None


def _run(candidate, incumbent=None, timer=None, seed=0):
    kernels = {"candidate": candidate, "incumbent": incumbent or Attention()}
    gen = torch.Generator().manual_seed(seed)
    stage = bm._Shape(kernels, SHAPE, HC, lambda line: None, {"candidate"}, timer or Timer(), random.Random(seed),
                      gen, [], "incumbent")
    return stage, *stage.run()


def test_an_honest_candidate_passes_against_the_incumbents_output_without_flash():
    stage, stats, problems = _run(Attention())
    assert problems["candidate"][0] == "" and stage.ref_name == "incumbent" and stage.vault is not None
    assert stage.tol[0] < 0.02  # err_mult x BF16's own error + the incumbent's + one ulp, relative per row
    assert len(stage.flags["candidate"]) == 5  # every launch, warm-ups included


def test_a_candidate_wrong_from_its_third_launch_on_is_caught_at_that_launch():
    _, _, problems = _run(Attention(lambda n, o: o.mul_(1.05) if n >= 3 else None))
    msg, status, _, _ = problems["candidate"]
    assert status == Status.INCORRECT and (msg.startswith("launch 3 of 5 wrong rows of O") or "FP32" in msg), msg


def test_a_small_error_flash_would_have_let_through_is_caught():
    """The old rule compared with FA2 within err_mult x (BF16's + FA2's error) + an ulp; against the incumbent
    the candidate keeps its own verify margin only: 2 % too large on every row fails."""
    _, _, problems = _run(Attention(lambda n, o: o.mul_(1.02)))
    assert problems["candidate"][1] == Status.INCORRECT and problems["candidate"][0], problems


def test_another_kernels_outputs_are_poisoned_before_the_next_kernel_runs():
    """A candidate that copies the incumbent's output (same inputs, same iteration) gets only poison."""
    stage_box = {}

    def copy_the_incumbents(o, lse):
        theirs = stage_box["stage"].outs["incumbent"]
        o.copy_(theirs.o)
        lse.copy_(theirs.lse)

    cand = Attention(peek=copy_the_incumbents)
    kernels = {"candidate": cand, "incumbent": Attention()}
    stage = bm._Shape(kernels, SHAPE, HC, lambda line: None, {"candidate"}, Timer(launches=8), random.Random(3),
                      torch.Generator().manual_seed(3), [], "incumbent")
    stage_box["stage"] = stage
    _, problems = stage.run()
    assert problems["candidate"][1] == Status.INCORRECT, problems  # NaN wherever the incumbent ran first
    assert torch.isnan(stage.outs["incumbent"].o).all() and not torch.isnan(stage.vault.o).any()


def test_the_fp32_recheck_is_drawn_from_every_launch_warm_ups_included():
    drawn = set()
    for seed in range(40):
        stage, _, _ = _run(Attention(), seed=seed)
        drawn.add(stage.recheck_at)
    assert drawn == set(range(5))


def test_a_wall_clock_suspicion_is_measured_again_alone_before_any_verdict():
    once = Timer(walls=lambda name, i: 13.2 if name == "candidate" else 1.0)  # one disturbed launch
    stage, _, problems = _run(Attention(), timer=once)
    assert problems["candidate"][0] == "" and once.remeasured == bm.WALL_REPEATS
    assert len(stage.flags["candidate"]) == 5 + bm.WALL_REPEATS  # the launches measured again are checked too
    always = Timer(walls=lambda name, i: 13.2)  # hidden work shows every time
    _, _, problems = _run(Attention(), timer=always)
    assert problems["candidate"][1] == Status.ERROR and "in each of 5 launches alone" in problems["candidate"][0]


def test_an_incumbent_that_fails_the_fp32_check_is_no_reference():
    """It falls back to FlashAttention-2; without one (this CPU), nothing is judged against a wrong answer."""
    with pytest.raises(bm.NoReference, match="cannot run|fails the FP32 check"):
        _run(Attention(), incumbent=Attention(lambda n, o: o.mul_(1.1)))
    assert bm.NoReference.status == Status.ERROR


def test_a_shape_releases_its_tensors_without_the_cyclic_collector():
    """The launch closures refer back to the stage: released explicitly, its buffers go at once (left to the
    cyclic collector, eight shapes' buffers piled up past harness.max_device_gb at d256)."""
    import gc
    import weakref

    stage, _, _ = _run(Attention())
    held = [weakref.ref(t) for t in (stage.q, stage.vault.o, stage.slots[0][0][0], stage.outs["candidate"].o)]
    gc.disable()
    try:
        stage.release()
        assert all(r() is None for r in held)
    finally:
        gc.enable()
