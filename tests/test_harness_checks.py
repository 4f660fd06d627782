"""What the verify stage checks, and that it tells honest kernels from ones wrong only where the old
check set never looked: long rows, long causal Sq != Sk, other head counts, V beyond FP16's range,
batches past 32-bit offsets, module memory written. The whole stage (avo.harness.verify.Checks) runs
on the CPU against attention written in torch (test doubles of a kernel, for the stage's logic); the
lengths are shrunk where the CPU could not afford the real ones, and the real kernels run on the GPU
(tests/gpu/adversarial)."""
from __future__ import annotations

import pytest
import torch

from avo.harness import envelope
from avo.harness.check import FAR, LAYOUTS, draw, place
from avo.harness.reference import attention_refs
from avo.harness.verify import Checks, cases, regime
from avo.problem import problem_from_cfg
from avo.types import Problem, Shape
from tests.conftest import make_cfg

HC = {"check_seeds": 2, "err_mult": 2.0, "atol": 1e-4}


def test_the_checks_cover_the_benchmarks_regime_and_what_a_caller_may_pass():
    for overrides in (["kernel=mha"], ["kernel=gqa", "group=8"]):
        problem = problem_from_cfg(make_cfg(*overrides).kernel)
        cs = cases(problem, 2, __import__("random").Random(0))
        longest = max(s.seqlen_k for s in problem.bench)
        for causal in (False, True):
            mine = [c for c in cs if c.shape.causal == causal]
            long = [c for c in mine if c.shape.seqlen_k > longest and c.shape.seqlen_q > longest]
            assert {c.dist for c in long} >= {"large", "wide"} and {c.layout for c in long} - {"contiguous"}
            assert any(c.layout == FAR for c in mine)  # past 32-bit offsets, for each mask
        causal_long = [c.shape for c in cs if c.shape.causal and max(c.shape.seqlen_q, c.shape.seqlen_k) > 8192]
        assert any(s.seqlen_q < s.seqlen_k for s in causal_long) and any(s.seqlen_q > s.seqlen_k for s in causal_long)
        assert {c.shape.heads_kv for c in cs} >= {1, 3, problem.heads_kv} and {c.shape.batch for c in cs} >= {1, 2, 3}
        assert all(c.shape.heads_q == problem.group * c.shape.heads_kv for c in cs)  # the group, always
        assert {c.dist for c in cs} == {"normal", "outliers", "large", "wide"}
        assert {c.layout for c in cs} == {*LAYOUTS, FAR}
        assert len({c.seed for c in cs}) == len(cs)  # fresh contents for every launch
        assert envelope.longest(s.seqlen_k for s in problem.bench) == max(c.shape.seqlen_k for c in cs)


def test_far_storage_places_batches_past_32_bit_offsets_with_guarded_outputs():
    shape = Shape(2, 67, 300, 1, 1, 128, True)
    q, k, v = draw(shape, torch.Generator().manual_seed(0), "wide", "cpu")
    assert v.float().abs().max() > 65504 and torch.isfinite(v.float()).all()  # beyond FP16, held by BF16
    fq, fk, fv, out = place(q, k, v, FAR, shape)
    assert out.buf.numel() > 2**31 and all(t.stride(0) == envelope.FAR_STRIDE for t in (fq, fk, fv, out.o))
    assert torch.equal(fq, q) and torch.equal(fk, k) and torch.equal(fv, v)
    assert not bool(out.guards_broken())
    out.o.zero_()
    out.lse.zero_()
    assert not bool(out.guards_broken())  # writing every element of the views touches nothing else
    out.buf[out.o[1].storage_offset() - 1] = 0.0  # just before the second batch's O
    assert bool(out.guards_broken())


class Attention:
    """A kernel's stand-in: exact attention in torch, with `wrong` deciding where it errs."""

    def __init__(self, wrong=lambda q, k, v, o, causal: None, half: bool = False, module=None):
        self.wrong, self.half, self.module, self.calls = wrong, half, module, 0

    def __call__(self, q, k, v, o, lse, causal, scale):
        self.calls += 1
        qq, kk, vv = (t.half() if self.half else t for t in (q, k, v))
        ref, ref_lse, _, _ = attention_refs(qq, kk, vv, causal, scale)
        if self.half:  # an FP16 pipeline: what does not fit FP16 is Inf
            ref = ref.half().float()
        o.copy_(ref.bfloat16())
        lse.copy_(ref_lse)
        self.wrong(q, k, v, o, causal)

    def guards_broken(self):
        return torch.tensor(False)

    def module_changed(self):
        return self.module(self.calls) if self.module else None


@pytest.fixture
def small(monkeypatch):
    """The real cases, with "long" rows of 203 keys and batches 2^18 apart: affordable on a CPU."""
    monkeypatch.setattr(envelope, "LONG_MIN", 200)
    monkeypatch.setattr(envelope, "FAR_STRIDE", 2**18 + 64)
    bench = tuple(Shape(1, 128, 128, 2, 2, 64, c) for c in (False, True))
    check = tuple(Shape(2, sq, sk, 2, 2, 64, c) for sq, sk in ((1, 1), (17, 17), (40, 70)) for c in (False, True))
    return Problem("t", 2, 2, 64, bench, check)


def _run(problem, kernel, seed=1, ahead=True):
    checks = Checks(problem, HC, seed=seed, device="cpu")
    if ahead:
        assert checks.prepare(None) == len(checks.cases) and checks.ahead_s > 0
        assert all(t.o.device.type == "cpu" for t in checks.truths.values())
    return checks.run(kernel, log=lambda line: None), checks


def test_an_honest_kernel_passes_every_case_with_truths_computed_ahead_or_after(small):
    for ahead in (True, False):
        r, checks = _run(small, Attention(), ahead=ahead)
        assert r.ok and r.checks == len(checks.cases), r.message


@pytest.mark.parametrize("name, kernel, words", [
    ("wrong only on long rows",
     Attention(lambda q, k, v, o, causal: o.mul_(1.02) if k.shape[1] > 128 else None),
     "full_b1_s203_h2-2_d64 (large, bhsd"),
    ("wrong only for three KV heads",
     Attention(lambda q, k, v, o, causal: o[:, :, -1].zero_() if k.shape[2] == 3 else None),
     "full_b3_s203_h3-3_d64"),
    ("wrong only past the far stride",
     Attention(lambda q, k, v, o, causal: o[1].copy_(o[0]) if q.stride(0) == envelope.FAR_STRIDE else None),
     "(normal, far"),
    ("wrong only for long causal Sq < Sk",
     Attention(lambda q, k, v, o, causal: o[:, :5].zero_() if causal and 100 < k.shape[1] > q.shape[1] else None),
     "causal_b2_s19x106_"),
    ("an FP16 pipeline", Attention(half=True), "(wide, "),
    ("writes module memory from its third launch", Attention(module=lambda n: "tbl" if n >= 3 else None),
     "module's memory (`tbl`)"),
    ("modifies its inputs on the reuse set",
     Attention(lambda q, k, v, o, causal: v.add_(1.0) if v.shape[1] == 17 else None),
     "modified its inputs"),
])
def test_a_kernel_wrong_only_where_the_old_checks_never_looked_fails(small, name, kernel, words):
    r, _ = _run(small, kernel)
    assert not r.ok and words in r.message, f"{name}: {r.message}"


def test_the_same_seed_draws_the_same_inputs_and_another_seed_others(small):
    a, b, c = Checks(small, HC, 5, "cpu"), Checks(small, HC, 5, "cpu"), Checks(small, HC, 6, "cpu")
    assert [x.seed for x in a.cases] == [x.seed for x in b.cases] != [x.seed for x in c.cases]
    first = [a._inputs(a.cases[0])[0], b._inputs(b.cases[0])[0]]
    assert all(torch.equal(x, y) for x, y in zip(*first, strict=True))


def test_regime_shapes_follow_the_problem(small):
    shapes = [s for s, _ in regime(small)]
    n = envelope.longest([128])
    assert [(s.seqlen_q, s.seqlen_k, s.causal) for s in shapes[:2]] == [(n, n, False), (n, n, True)]
    assert all(s.head_dim == 64 and s.heads_q == s.heads_kv for s in shapes)


def test_one_bf16_ulp_off_at_the_largest_outputs_passes_and_three_fail():
    """An honest kernel may round a value near a BF16 midpoint to the neighbouring number: near |O| = 3
    that ulp (1.56e-2) exceeds twice the reference's own largest rounding error (seen: 1.44e-2 against
    a tolerance of 1.39e-2 on the d64 seed). One ulp more than the precision rule is allowed, three are not."""
    from avo.harness.check import Truth, bf16_ulp, judge

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 8, 2, 64, generator=gen) * 3.0
    lse = torch.zeros(1, 2, 8)
    t = Truth(ref, lse, None, tol=1e-3, row_tol=1.0)  # a tolerance well under one ulp of |O| ~ 3
    nearest = ref.bfloat16()
    up = torch.full_like(nearest, float("inf"))
    # the BF16 number on the other side of each value: less than one ulp from it, but not the nearest
    other = torch.where(ref > nearest.float(), torch.nextafter(nearest, up), torch.nextafter(nearest, -up))
    assert bool(((other.float() - ref).abs() > t.tol).any())
    ok, _, msg = judge(other, lse, t, 1e-4, 1e-3)
    assert ok, msg
    ok, _, msg = judge((ref + 3 * bf16_ulp(ref)).bfloat16(), lse, t, 1e-4, 1e-3)
    assert not ok and "beyond one BF16 ulp" in msg, msg


def test_lse_allows_a_tensor_core_sum_of_large_logits_and_nothing_more_at_ordinary_ones():
    """LSE carries the accumulation error of the largest logits: 2^-16 of scale * sum |q_i k_i| (what sm80 and
    the first sm90 showed with logits of a few hundred) passes; 0.01 at N(0, 1) inputs does not."""
    import math

    from avo.harness.check import ACC_EPS, judge, logit_bound, truth

    gen = torch.Generator().manual_seed(1)
    shape = (1, 64, 2, 128)
    for mult, shift, ok_expected in ((30.0, "bound/4", True), (1.0, 0.01, False), (1.0, "bound/4", True)):
        q, k, v = (torch.randn(*shape, generator=gen).bfloat16() for _ in range(3))
        q = (q.float() * mult).bfloat16()
        scale = 1 / math.sqrt(128)
        t = truth(q, k, v, False, 2.0, 1e-4, scale=scale)
        bound = ACC_EPS * logit_bound(q, k, scale)
        assert torch.allclose(t.lse_bound, bound)
        delta = bound / 4 if shift == "bound/4" else torch.full_like(t.lse, shift)
        ok, _, msg = judge(t.o.bfloat16(), t.lse + delta, t, 1e-4, 1e-3)
        assert ok == ok_expected, (mult, shift, msg)
        if not ok:
            assert "max|LSE - ref|" in msg
    assert float(ACC_EPS * logit_bound((torch.randn(*shape, generator=gen)).bfloat16(),
                                       torch.randn(*shape, generator=gen).bfloat16(), scale).max()) < 1e-3


def test_the_truth_pool_computes_a_seeds_truths_once_and_judges_with_them_as_when_computed(small, tmp_path):
    """avo.harness.truths: the first evaluation that meets a seed computes and saves its truths (ahead or after the
    launches), a later one loads them all; a wrong kernel fails against loaded truths as against computed ones, and
    a file that cannot be read is computed again."""
    first = Checks(small, HC, seed=7, device="cpu", pool=str(tmp_path))
    assert first.loaded == 0 and first.prepare(None, stop=lambda: len(first.truths) >= 5) >= 5  # some ahead
    assert first.run(Attention(), log=lambda line: None).ok
    first.save()
    again = Checks(small, HC, seed=7, device="cpu", pool=str(tmp_path))
    assert again.loaded == len(again.cases) == len(first.cases) and again.pool == first.pool
    for i, t in first.truths.items():
        assert torch.equal(again.truths[i].o, t.o) and again.truths[i].tol == t.tol
    assert again.run(Attention(), log=lambda line: None).ok
    again.save()  # nothing new: the file is left as it was
    wrong = Attention(lambda q, k, v, o, causal: o[..., 0].add_(0.5) if q.shape[1] > 30 else None)
    loaded = Checks(small, HC, seed=7, device="cpu", pool=str(tmp_path))
    assert loaded.loaded == len(loaded.cases) and not loaded.run(wrong, log=lambda line: None).ok
    assert Checks(small, HC, seed=8, device="cpu", pool=str(tmp_path)).loaded == 0  # other inputs, other file
    first.pool.write_bytes(b"not a pickle")
    assert Checks(small, HC, seed=7, device="cpu", pool=str(tmp_path)).loaded == 0
    assert Checks(small, HC, seed=None, device="cpu", pool=str(tmp_path)).pool is None  # fresh inputs: no pool
