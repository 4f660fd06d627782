"""The verify stage: what a candidate is checked on before anything is timed, and the check itself.

The cases cover what is timed and what a caller may pass (avo.export's op accepts only that):
- the kernel config's check set (odd lengths, Sq != Sk, both masks, the problem's heads), each
  shape with several input sets (`input_plan`): fresh contents, the same buffers with new
  contents (a result cached by pointer fails), outliers, large logits or V beyond FP16's range,
  layouts rotating so that every layout meets every length and mask;
- the benchmark's regime (`regime`): rows longer than the longest benchmark shape (at least
  32771 keys, avo.harness.envelope) for each mask with large logits, V beyond FP16's range and strided layouts; long
  causal Sq < Sk and Sq > Sk; other head counts (one KV head, three) and batch sizes; and
  batches 2^31 + 64 elements apart in one buffer (check.FAR), past every 32-bit offset.
Long shapes are checked on sampled rows against the FP32 truth (the benchmark then checks every
row of every timed launch); the others on every row.

The truth does not depend on the candidate: `Checks.prepare` computes it while NVRTC compiles
the candidate, from inputs drawn from per-case seeds, and keeps it on the host until the
candidate has run (a kernel can read any device memory of its process: it must never find the
answer there). `Checks.run` draws the same inputs again, launches and judges. Worker-side.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from avo.harness import truths
from avo.harness.check import FAR, LAYOUTS, CheckResult, Outputs, Truth, draw, judge, place, random_scale, truth
from avo.harness.devlock import gpu_lock
from avo.harness.envelope import longest
from avo.harness.stopwatch import piece
from avo.types import Problem, Shape

SAMPLED_ROWS = 512       # query rows checked against the FP32 truth on a long shape
FULL_ROWS_MAX = 2 ** 25  # Sq * Sk up to which every row is checked (4097 x 4097 is 2^24)
LSE_ATOL = 1e-3


@dataclass(frozen=True)
class Case:
    """One launch of the verify stage: a shape, its inputs' distribution, layout and seed."""
    shape: Shape
    dist: str
    layout: str
    reuse: bool     # the buffers of the case before it, with new contents
    seed: int

    @property
    def sampled(self) -> bool:
        return self.shape.seqlen_q * self.shape.seqlen_k > FULL_ROWS_MAX

    def where(self, scale: float) -> str:
        return f"{self.shape.key} ({self.dist}, {self.layout}, scale {scale:.4f})"

    @property
    def kind(self) -> str:
        """What its truth costs like (benchmarks/eval_cost.py): far, sampled rows, or every row of Sq x Sk."""
        if self.layout == FAR:
            return "far"
        return "sampled" if self.sampled else f"{self.shape.seqlen_q}x{self.shape.seqlen_k}"


def input_plan(shape_index: int, seeds: int) -> list[tuple[str, str, bool]]:
    """(distribution, layout, same buffers as the set before) of each input set of one check shape.

    Layouts rotate over the check shapes, so every layout meets odd lengths, both masks and GQA; the
    check set lists each length without and with the causal mask, so each length meets large logits
    (non-causal) and V beyond FP16's range (causal)."""
    lay = [LAYOUTS[(shape_index + i) % len(LAYOUTS)] for i in range(3)]
    fourth = "large" if shape_index % 2 == 0 else "wide"
    plan = [("normal", lay[0], False), ("normal", lay[0], True), ("outliers", lay[1], False), (fourth, lay[2], False)]
    while len(plan) < seeds:
        plan.append(("normal", LAYOUTS[len(plan) % len(LAYOUTS)], False))
    return plan


def regime(problem: Problem) -> list[tuple[Shape, list[tuple[str, str]]]]:
    """Shapes beyond the kernel config's check set, each with its (distribution, layout) input sets."""
    g, d = problem.group, problem.head_dim
    n = longest(s.seqlen_k for s in problem.bench)  # 32771 by default
    m, e = n // 11 | 1, min(777, n)  # 2979 and 777 by default: odd, never a tile multiple

    def shape(b, sq, sk, hkv, causal):
        return Shape(b, sq, sk, g * hkv, hkv, d, causal)

    return [  # two KV heads where the layout matters: one head in (B, H, S, D) storage is contiguous
        (shape(1, n, n, 2, False), [("large", "bhsd"), ("wide", "padded")]),
        (shape(1, n, n, 2, True), [("large", "padded"), ("wide", "packed")]),
        (shape(1, m, n, 1, False), [("large", "contiguous")]),
        (shape(2, m, n // 2 + 5, 1, True), [("normal", "bhsd"), ("large", "packed")]),
        (shape(1, n // 2 + 7, m, 1, True), [("outliers", "padded")]),
        (shape(3, e, e, 3, False), [("normal", "packed")]),
        (shape(3, e, e, 3, True), [("wide", "bhsd")]),
        (shape(2, 67, 67, 1, False), [("normal", FAR)]),
        (shape(2, 67, 300, 1, True), [("wide", FAR)]),
    ]


def cases(problem: Problem, seeds: int, rng: random.Random) -> list[Case]:
    out = []
    for si, shape in enumerate(problem.check):
        out += [Case(shape, dist, layout, reuse, rng.getrandbits(62)) for dist, layout, reuse in input_plan(si, seeds)]
    for shape, plan in regime(problem):
        out += [Case(shape, dist, layout, False, rng.getrandbits(62)) for dist, layout in plan]
    return out


class Checks:
    """The verify stage of one evaluation: its cases and their FP32 truths (see the module docstring)."""

    def __init__(self, problem: Problem, hc: dict, seed: int | None = None, device: str = "cuda",
                 pool: str | None = None):
        """seed: the inputs' (None: fresh ones); pool: with a seed, the folder of the truths a search reuses
        (avo.harness.truths), loaded now and saved by save()."""
        rng = random.Random(seed if seed is not None else random.SystemRandom().getrandbits(62))
        self.device = device
        self.cases = cases(problem, hc["check_seeds"], rng)
        self.err_mult, self.atol = hc["err_mult"], hc["atol"]
        self.pool = (truths.pool_file(pool, self.cases, self.err_mult, self.atol, device)
                     if pool and seed is not None else None)
        self.truths: dict[int, Truth] = truths.load(self.pool) if self.pool is not None else {}
        self.loaded = len(self.truths)  # of them, from the pool
        self.ahead_s = 0.0  # seconds spent on truths before the candidate was ready

    def save(self) -> None:
        """Into the pool, where this evaluation computed truths it did not find there."""
        if self.pool is not None and len(self.truths) > self.loaded:
            with piece("truths saved"):
                truths.save(self.pool, self.truths)

    def _inputs(self, case: Case):
        gen = torch.Generator(device=self.device)
        gen.manual_seed(case.seed)
        q, k, v = draw(case.shape, gen, case.dist, self.device)
        scale = random_scale(case.shape.head_dim, gen)
        rows = _rows(case.shape, gen) if case.sampled else None
        return (q, k, v), scale, rows

    def _truth(self, case: Case, inputs, scale: float, rows) -> Truth:
        with piece(f"truth:{case.kind}"):
            return truth(*inputs, case.shape.causal, self.err_mult, self.atol, rows, scale)

    def prepare(self, lock: str | None, stop=lambda: False) -> int:
        """Compute the truths not yet known, case by case under the shared device lock, until stop();
        returns how many are known. Each is moved to the host, and the device's copies are given back.
        Never waits for the lock (while another worker times, it waits for stop() instead): the truths
        that are left are computed after the launches, as without this."""
        t0 = time.perf_counter()
        todo = [i for i in range(len(self.cases)) if i not in self.truths]
        while todo and not stop():
            with gpu_lock(lock, exclusive=False, wait=False) as held:
                if held:
                    case = self.cases[todo[0]]
                    with piece("draw"):
                        inputs, scale, rows = self._inputs(case)
                    t = self._truth(case, inputs, scale, rows)
                    with piece("truth to host"):
                        self.truths[todo.pop(0)] = t.to("cpu")
                        if t.o.device.type != "cpu":  # the answer leaves no copy on the device: the freed
                            t.o.zero_()               # blocks stay in the allocator's cache, and a segment
                            t.lse.zero_()             # shared with a live tensor is never given back
            if not held:
                time.sleep(0.01)
        self.ahead_s += time.perf_counter() - t0
        return len(self.truths)

    def run(self, kernel, log) -> CheckResult:
        """Launch the kernel on every case and judge it (the first failure ends the stage). The caller holds
        the device lock (shared)."""
        self._release()  # what held the truths computed ahead goes back to the driver: no kernel can map it
        worst, n, last, shape_worst = 0.0, 0, None, 0.0
        held = None  # the inputs of the case before, for a case that reuses its buffers
        for i, case in enumerate(self.cases):
            if last is not None and case.shape != last:
                log(f"check {last.key}: ok (max |O - ref| {shape_worst:.2e})")
                shape_worst = 0.0
            last = case.shape
            with piece("draw"):
                inputs, scale, rows = self._inputs(case)
            with piece("place"):
                if case.reuse and held is not None:
                    for t, new in zip(held, inputs, strict=True):
                        t.copy_(new)
                    q, k, v, out = *held, Outputs(case.shape, self.device, case.layout)
                else:
                    q, k, v, out = place(*inputs, case.layout, case.shape)
            held = (q, k, v) if case.layout != FAR else None
            with piece("launch"):
                self._sync()
                kernel(q, k, v, out.o, out.lse, case.shape.causal, scale)
                self._sync()
            n += 1
            where = case.where(scale)
            with piece("guards and inputs"):
                broken = bool(out.guards_broken() | kernel.guards_broken())
                changed = not all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v), strict=True))
            if broken:
                return CheckResult(False, worst, f"{where}: wrote outside O, LSE or its tile counter", n)
            if changed:
                return CheckResult(False, worst, f"{where}: modified its inputs", n)
            known = self.truths.get(i)
            if known is not None:
                with piece("truth to device"):
                    t = known.to(self.device)
            else:
                t = self._truth(case, inputs, scale, rows)
                if self.pool is not None:  # for the later evaluations that draw these inputs
                    with piece("truth to host"):
                        self.truths[i] = t.to("cpu")
            with piece("judge"):
                ok, err, msg = judge(out.o, out.lse, t, self.atol, LSE_ATOL)
            if not ok:
                return CheckResult(False, err, f"{where}: {msg}", n)
            worst, shape_worst = max(worst, err), max(shape_worst, err)
            del q, k, v, out, t
        if last is not None:
            log(f"check {last.key}: ok (max |O - ref| {shape_worst:.2e})")
        with piece("module check"):
            changed = kernel.module_changed()
        if changed:
            return CheckResult(False, worst, f"wrote into its module's memory (`{changed}`): state that outlives "
                                             "a launch", n)
        self._release()  # the far layout's 4.3 GB buffer, and the rest, go back to the driver
        return CheckResult(True, worst, "", n)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _release(self) -> None:
        if self.device == "cuda":
            with piece("empty_cache"):
                torch.cuda.empty_cache()


def _rows(shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """SAMPLED_ROWS random query rows plus the edges: the first and last rows, and where the causal mask
    starts to show a key (Sq > Sk)."""
    sq, sk = shape.seqlen_q, shape.seqlen_k
    rows = torch.randperm(sq, generator=gen, device=gen.device)[:SAMPLED_ROWS]
    edges = [r for r in (0, sq - 1, sq - sk - 1, sq - sk) if 0 <= r < sq]
    return torch.unique(torch.cat([rows, torch.tensor(edges, device=gen.device)]))
