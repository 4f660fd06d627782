"""Correctness of a candidate against the FP32 reference, with a precision-derived tolerance.

Pass iff, for O, max|out - ref| <= err_mult * max|bf16_ref - ref| + atol (FlashAttention's rule:
the tolerance follows the error BF16 itself must make) both globally and per query row (each
row's error relative to that row's magnitude, so a wrong row of small outputs cannot hide under
the largest row's tolerance), and for LSE within `lse_atol`. NaN/Inf never pass; rows with no
visible key must give o = 0 and lse = -inf exactly. Worker-side.

What the input sets vary, so that a kernel is checked on everything a caller may vary:
- contents: fresh random numbers per set; the second set reuses the first's buffers with new
  contents (a result cached by pointer fails), later sets use new buffers at new addresses;
- distribution: N(0,1), outlier-heavy N(0,1) + N(0,100)·Bernoulli(0.001), and logits well over
  80 (a softmax without a running max overflows);
- softmax_scale: drawn per set (a kernel that assumes 1/sqrt(d) fails);
- layout: contiguous, views of one packed QKV tensor, (B, H, S, D) storage, and padded head
  strides; O and LSE likewise, with padding that must stay untouched.
Every launch's outputs sit in NaN-poisoned buffers with guard bands, and the inputs must be left
bit-identical; the references are computed from pristine copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from avo.harness.reference import attention_refs
from avo.types import Shape

GUARD = 4096  # elements of NaN guard band on each side of every output
LAYOUTS = ("contiguous", "packed", "bhsd", "padded")
PAD = 64      # extra elements per padded head (keeps TMA's 16-byte stride alignment)


@dataclass
class CheckResult:
    ok: bool
    max_err: float = 0.0     # worst max|o - ref| over all checks
    message: str = ""       # the first failure, one line
    checks: int = 0


def _strided(shape4: tuple[int, int, int, int], layout: str, dtype, device, mask: bool = False):
    """A (B, S, H, D) view in the given storage layout inside a flat buffer with guard bands.

    Returns (view, flat buffer, and with mask=True the boolean buffer marking what the view covers)."""
    b, s, h, d = shape4
    inner, perm = {"bhsd": ((b, h, s, d), (0, 2, 1, 3)), "padded": ((b, s, h, d + PAD), None)}.get(
        layout, ((b, s, h, d), None))
    n = math.prod(inner)

    def place(flat: torch.Tensor) -> torch.Tensor:  # the same view of any buffer of the same size
        view = flat[GUARD:GUARD + n].view(inner)
        view = view.permute(*perm) if perm else view
        return view[..., :d] if layout == "padded" else view

    flat = torch.empty(2 * GUARD + n, dtype=dtype, device=device)
    covered = None
    if mask:
        covered = torch.zeros(flat.shape, dtype=torch.bool, device=device)
        place(covered).fill_(True)
    return place(flat), flat, covered


class Outputs:
    """O and LSE views inside larger NaN-filled buffers, so stray writes are visible."""

    def __init__(self, shape: Shape, device="cuda", layout: str = "contiguous"):
        b, sq, hq, d = shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim
        self.layout = layout
        self.o, self._o, self._o_in = _strided((b, sq, hq, d), layout, torch.bfloat16, device, mask=True)
        # LSE rows are contiguous (the contract); heads and batches may be strided
        n = b * hq * (sq + (PAD if layout not in ("contiguous", "bhsd") else 0))
        self._lse = torch.empty(2 * GUARD + n, dtype=torch.float32, device=device)
        self._lse_in = torch.zeros(self._lse.shape, dtype=torch.bool, device=device)
        views = []
        for t in (self._lse, self._lse_in):
            inner = t[GUARD:GUARD + n]
            if layout == "contiguous":
                views.append(inner.view(b, hq, sq))
            elif layout == "bhsd":  # (H, B, S) storage
                views.append(inner.view(hq, b, sq).permute(1, 0, 2))
            else:                   # padded rows
                views.append(inner.view(b, hq, sq + PAD)[..., :sq])
        self.lse = views[0]
        views[1].fill_(True)
        self.poison()

    def poison(self) -> None:
        self._o.fill_(float("nan"))
        self._lse.fill_(float("nan"))

    def guards_broken(self) -> torch.Tensor:
        """A GPU boolean: was anything outside the O and LSE views (guard bands, padding) written?
        (no host synchronisation; contiguous outputs only have guard bands to look at)"""
        broken = [(~torch.isnan(t[:GUARD])).any() | (~torch.isnan(t[-GUARD:])).any() for t in (self._o, self._lse)]
        if self.layout != "contiguous":
            broken += [(~torch.isnan(t) & ~m).any() for t, m in ((self._o, self._o_in), (self._lse, self._lse_in))]
        return torch.stack(broken).any()


def random_inputs(shape: Shape, gen: torch.Generator, dist: str = "normal", layout: str = "contiguous",
                  device="cuda"):
    """(q, k, v) in the given distribution ("normal", "outliers", "large") and storage layout."""
    b, sq, sk, hq, hkv, d = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.heads_q, shape.heads_kv, shape.head_dim

    def draw(*size):
        x = torch.randn(*size, generator=gen, device=device)
        if dist == "outliers":
            spikes = torch.rand(x.shape, generator=gen, device=device) < 1e-3
            x = x + spikes * torch.randn(x.shape, generator=gen, device=device) * 10.0
        return x

    if layout == "packed":  # one (B, S, Hq + 2 Hkv, D) tensor, as a fused QKV projection writes it
        if sq == sk:
            qkv = draw(b, sq, hq + 2 * hkv, d).to(torch.bfloat16)
            q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
        else:
            q = draw(b, sq, hq, d).to(torch.bfloat16)
            kv = draw(b, sk, 2 * hkv, d).to(torch.bfloat16)
            k, v = kv[:, :, :hkv], kv[:, :, hkv:]
    else:
        q, k, v = (_strided(s, layout, torch.bfloat16, device)[0] for s in ((b, sq, hq, d), (b, sk, hkv, d),
                                                                            (b, sk, hkv, d)))
        for t, s in zip((q, k, v), ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)), strict=True):
            t.copy_(draw(*s))
    if dist == "large":  # logits of about +-100 and more: exp without a running max overflows
        q.mul_(30.0)
    return q, k, v


def random_scale(head_dim: int, gen: torch.Generator) -> float:
    """softmax_scale drawn from [0.5, 2] / sqrt(d): a kernel must read p.softmax_scale."""
    u = float(torch.rand(1, generator=gen, device=gen.device).item())
    return (0.5 + 1.5 * u) / math.sqrt(head_dim)


def compare(o, lse, q, k, v, causal: bool, err_mult: float, atol: float, lse_atol: float,
            rows: torch.Tensor | None = None, scale: float | None = None) -> tuple[bool, float, str]:
    """Compare (o, lse) (full tensors) with the references on `rows` (all rows if None)."""
    if rows is not None:
        o, lse = o[:, rows], lse[:, :, rows]
    if torch.isnan(o).any() or torch.isnan(lse).any():
        n = int(torch.isnan(o).sum()) + int(torch.isnan(lse).sum())
        return False, float("nan"), f"{n} output elements are NaN: not written, or computed as NaN"
    ref_o, ref_lse, bf_o, _ = attention_refs(q, k, v, causal, scale, rows)
    of = o.float()
    if torch.isinf(of).any():
        return False, float("inf"), "O contains Inf"
    diff, bf_diff = (of - ref_o).abs(), (bf_o - ref_o).abs()
    err = diff.max().item()
    tol = err_mult * bf_diff.max().item() + atol
    if not err <= tol:
        return False, err, f"max|O - ref| = {err:.3e} > tolerance {tol:.3e}"
    # per row, relative to the row's own magnitude: (B, rows, H)
    mag = ref_o.abs().amax(-1).clamp_min(1e-30)
    rel, bf_rel = diff.amax(-1) / mag, bf_diff.amax(-1) / mag
    row_tol = err_mult * bf_rel.max().item() + atol / mag
    bad = rel > row_tol
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        return False, err, (f"{int(bad.sum())} query rows wrong relative to their own magnitude (worst "
                            f"{rel.max().item():.3e} > {err_mult * bf_rel.max().item():.3e}; first at flat index {i})")
    empty = torch.isneginf(ref_lse)
    if not torch.equal(torch.isneginf(lse), empty):
        return False, err, "LSE must be -inf exactly for rows with no visible key, and finite elsewhere"
    if empty.any() and not bool((of.permute(0, 2, 1, 3)[empty] == 0).all()):
        return False, err, "rows with no visible key must have O = 0 exactly"
    if torch.isinf(lse[~empty]).any():
        return False, err, "LSE contains Inf"
    full = ~empty
    lse_err = (lse[full] - ref_lse[full]).abs().max().item() if full.any() else 0.0
    if not lse_err <= lse_atol:
        return False, err, f"max|LSE - ref| = {lse_err:.3e} > tolerance {lse_atol:.3e}"
    return True, err, ""


def input_plan(shape_index: int, seeds: int) -> list[tuple[str, str, bool]]:
    """(distribution, layout, same buffers as the set before) of each input set of one check shape.

    Layouts rotate over the check shapes, so every layout meets odd lengths, both masks and GQA."""
    lay = [LAYOUTS[(shape_index + i) % len(LAYOUTS)] for i in range(3)]
    plan = [("normal", lay[0], False), ("normal", lay[0], True), ("outliers", lay[1], False), ("large", lay[2], False)]
    while len(plan) < seeds:
        plan.append(("normal", LAYOUTS[len(plan) % len(LAYOUTS)], False))
    return plan


def verify(kernel, shapes: tuple[Shape, ...], seeds: int, err_mult: float, atol: float,
           lse_atol: float = 1e-3, base_seed: int | None = None, log=print) -> CheckResult:
    """Run every check shape on every input set of `input_plan` (see the module docstring)."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(base_seed if base_seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    worst, n = 0.0, 0
    for si, shape in enumerate(shapes):
        shape_worst = 0.0
        q = k = v = None
        for trial, (dist, layout, reuse) in enumerate(input_plan(si, seeds)):
            if reuse:   # same buffers, new contents: catches results cached by pointer
                for t, new in zip((q, k, v), random_inputs(shape, gen, dist, layout), strict=True):
                    t.copy_(new)
            else:       # new buffers (old ones still alive, so the addresses differ)
                q, k, v = random_inputs(shape, gen, dist, layout)
            out = Outputs(shape, layout=layout)
            scale = random_scale(shape.head_dim, gen)
            pristine = [t.clone() for t in (q, k, v)]
            torch.cuda.synchronize()
            kernel(q, k, v, out.o, out.lse, shape.causal, scale)
            torch.cuda.synchronize()
            n += 1
            where = f"{shape.key} input set {trial} ({dist}, {layout}, scale {scale:.4f})"
            if bool(out.guards_broken() | kernel.guards_broken()):
                return CheckResult(False, worst, f"{where}: wrote outside O, LSE or its tile counter", n)
            if not all(torch.equal(a, b) for a, b in zip(pristine, (q, k, v), strict=True)):
                return CheckResult(False, worst, f"{where}: modified its inputs", n)
            ok, err, msg = compare(out.o, out.lse, *pristine, shape.causal, err_mult, atol, lse_atol, scale=scale)
            if not ok:
                return CheckResult(False, err, f"{where}: {msg}", n)
            worst, shape_worst = max(worst, err), max(shape_worst, err)
        log(f"check {shape.key}: ok (max |O - ref| {shape_worst:.2e})")
    return CheckResult(True, worst, "", n)
