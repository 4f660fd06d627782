"""Correctness of a candidate against the FP32 reference, with a precision-derived tolerance.

Pass iff, for O, max|out - ref| <= err_mult * max|bf16_ref - ref| + atol (FlashAttention's rule:
the tolerance follows the error BF16 itself must make), and for LSE likewise with the BF16
reference's LSE error, plus an absolute floor of `lse_atol`. NaN/Inf never pass; rows with no
visible key must give o = 0 and lse = -inf exactly. Worker-side.

Tricks each run is built to catch:
- outputs and guard bands around them are poisoned with NaN before every launch: every element
  must be written, and nothing outside the outputs may be;
- inputs are fresh random numbers per seed, and the second seed reuses the first's buffers with
  new contents (a result cached by pointer fails), the third uses new buffers at new addresses;
- the third seed draws an outlier-heavy distribution, N(0,1) + N(0,100)·Bernoulli(0.001);
- the inputs must be left unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avo.harness.reference import attention_ref
from avo.types import Shape

GUARD = 4096  # elements of NaN guard band on each side of every output


@dataclass
class CheckResult:
    ok: bool
    max_err: float = 0.0     # worst max|o - ref| over all checks
    message: str = ""       # the first failure, one line
    checks: int = 0


class Outputs:
    """O and LSE views inside larger NaN-filled buffers, so stray writes are visible."""

    def __init__(self, shape: Shape, device="cuda"):
        b, sq, hq, d = shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim
        self._o = torch.empty(2 * GUARD + b * sq * hq * d, dtype=torch.bfloat16, device=device)
        self._lse = torch.empty(2 * GUARD + b * hq * sq, dtype=torch.float32, device=device)
        self.o = self._o[GUARD:-GUARD].view(b, sq, hq, d)
        self.lse = self._lse[GUARD:-GUARD].view(b, hq, sq)

    def poison(self) -> None:
        self._o.fill_(float("nan"))
        self._lse.fill_(float("nan"))

    def guards_intact(self) -> bool:
        return all(bool(torch.isnan(t[:GUARD]).all() and torch.isnan(t[-GUARD:]).all()) for t in (self._o, self._lse))


def random_inputs(shape: Shape, gen: torch.Generator, outliers: bool = False, device="cuda"):
    def draw(s, h):
        x = torch.randn(shape.batch, s, h, shape.head_dim, generator=gen, device=device)
        if outliers:
            spikes = torch.rand(x.shape, generator=gen, device=device) < 1e-3
            x = x + spikes * torch.randn(x.shape, generator=gen, device=device) * 10.0
        return x.to(torch.bfloat16)
    return (draw(shape.seqlen_q, shape.heads_q), draw(shape.seqlen_k, shape.heads_kv),
            draw(shape.seqlen_k, shape.heads_kv))


def compare(o, lse, q, k, v, causal: bool, err_mult: float, atol: float, lse_atol: float,
            rows: torch.Tensor | None = None) -> tuple[bool, float, str]:
    """Compare (o, lse) (full tensors) with the references on `rows` (all rows if None)."""
    if rows is not None:
        o, lse = o[:, rows], lse[:, :, rows]
    if torch.isnan(o).any() or torch.isnan(lse).any():
        n = int(torch.isnan(o).sum()) + int(torch.isnan(lse).sum())
        return False, float("nan"), f"{n} output elements are NaN: not written, or computed as NaN"
    ref_o, ref_lse = attention_ref(q, k, v, causal, upcast=True, rows=rows)
    bf_o, bf_lse = attention_ref(q, k, v, causal, upcast=False, rows=rows)
    of = o.float()
    if torch.isinf(of).any():
        return False, float("inf"), "O contains Inf"
    err = (of - ref_o).abs().max().item()
    tol = err_mult * (bf_o - ref_o).abs().max().item() + atol
    if not err <= tol:
        return False, err, f"max|O - ref| = {err:.3e} > tolerance {tol:.3e}"
    empty = torch.isneginf(ref_lse)
    if not torch.equal(torch.isneginf(lse), empty):
        return False, err, "LSE must be -inf exactly for rows with no visible key, and finite elsewhere"
    if torch.isinf(lse[~empty]).any():
        return False, err, "LSE contains Inf"
    full = ~empty
    lse_err = (lse[full] - ref_lse[full]).abs().max().item() if full.any() else 0.0
    lse_tol = err_mult * ((bf_lse[full] - ref_lse[full]).abs().max().item() if full.any() else 0.0) + lse_atol
    if not lse_err <= lse_tol:
        return False, err, f"max|LSE - ref| = {lse_err:.3e} > tolerance {lse_tol:.3e}"
    return True, err, ""


def verify(kernel, shapes: tuple[Shape, ...], seeds: int, err_mult: float, atol: float,
           lse_atol: float = 1e-3, base_seed: int | None = None, log=print) -> CheckResult:
    """Run every check shape on max(seeds, 3) input sets (see the module docstring)."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(base_seed if base_seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    worst, n = 0.0, 0
    for shape in shapes:
        shape_worst = 0.0
        out = Outputs(shape)
        q, k, v = random_inputs(shape, gen)
        for trial in range(max(seeds, 3)):
            if trial == 1:    # same buffers, new contents: catches results cached by pointer
                for t, new in zip((q, k, v), random_inputs(shape, gen), strict=True):
                    t.copy_(new)
            elif trial >= 2:  # new buffers (old ones still alive, so the addresses differ)
                q, k, v = random_inputs(shape, gen, outliers=(trial == 2))
                out = Outputs(shape)
            inputs = [t.clone() for t in (q, k, v)]
            out.poison()
            torch.cuda.synchronize()
            kernel(q, k, v, out.o, out.lse, shape.causal)
            torch.cuda.synchronize()
            n += 1
            where = f"{shape.key} input set {trial}"
            if not out.guards_intact():
                return CheckResult(False, worst, f"{where}: wrote outside O or LSE", n)
            if not all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v), strict=True)):
                return CheckResult(False, worst, f"{where}: modified its inputs", n)
            ok, err, msg = compare(out.o, out.lse, q, k, v, shape.causal, err_mult, atol, lse_atol)
            if not ok:
                return CheckResult(False, err, f"{where}: {msg}", n)
            worst, shape_worst = max(worst, err), max(shape_worst, err)
        log(f"check {shape.key}: ok (max |O - ref| {shape_worst:.2e})")
    return CheckResult(True, worst, "", n)
