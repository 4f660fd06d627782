"""Correctness of a candidate against the FP32 reference, with a precision-derived tolerance.

Pass iff, for O, max|out - ref| <= err_mult * max|bf16_ref - ref| + atol (FlashAttention's rule:
the tolerance follows the error BF16 itself must make) both globally and per query row (each
row's error relative to that row's magnitude, so a wrong row of small outputs cannot hide under
the largest row's tolerance), and for LSE within `lse_atol` plus what a tensor core's FP32 sum of the row's
logits may add (ACC_EPS of scale * sum |q_i k_i|: large logits). NaN/Inf never pass; rows with no
visible key must give o = 0 and lse = -inf exactly. The truth (`Truth`, from avo.harness.reference)
and the judgement (`judge`) are separate, so the truth can be computed before the candidate runs
and kept off the device meanwhile (avo.harness.verify). Worker-side.

What callers may vary, and the check inputs therefore vary (avo.harness.verify picks per case):
- contents (`draw`): N(0,1); outlier-heavy N(0,1) + N(0,100)·Bernoulli(0.001); logits well over
  80 ("large": a softmax without a running max overflows); V far beyond FP16's range ("wide":
  BF16 holds 2^17, an FP16 accumulator or intermediate overflows to Inf);
- layout (`place`): contiguous, views of one packed QKV tensor, (B, H, S, D) storage, padded
  head strides, and "far": batches 2^31 + 64 elements apart in one buffer, so a 32-bit offset
  overflows while the compute stays small (avo.harness.envelope). O and LSE
  likewise, with padding and guard bands that must stay untouched (NaN-poisoned).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from avo.harness import envelope
from avo.harness.reference import attention_refs, head_pairs
from avo.types import Shape

GUARD = 4096  # elements of NaN guard band on each side of every output
LAYOUTS = ("contiguous", "packed", "bhsd", "padded")
FAR = "far"   # the layout past 32-bit offsets (one buffer of 4.3 GB)
PAD = 64      # extra elements per padded head (keeps TMA's 16-byte stride alignment)
DISTS = ("normal", "outliers", "large", "wide")
WIDE = 2.0 ** 17  # V's scale in "wide": most values beyond FP16's 65504, exact in BF16


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
        self._lse, self._lse_in, self.lse = _lse_buffers(shape, layout, device)
        self.poison()

    def poison(self) -> None:
        self._o.fill_(float("nan"))
        self._lse.fill_(float("nan"))

    def guards_broken(self) -> torch.Tensor:
        """A GPU boolean: was anything outside the O and LSE views (guard bands, padding) written?
        (no host synchronisation; contiguous outputs only have guard bands to look at)"""
        broken = [_band_written(t) for t in (self._o, self._lse)]
        if self.layout != "contiguous":
            broken += [(~torch.isnan(t) & ~m).any() for t, m in ((self._o, self._o_in), (self._lse, self._lse_in))]
        return torch.stack(broken).any()


def _band_written(t: torch.Tensor) -> torch.Tensor:
    return (~torch.isnan(t[:GUARD])).any() | (~torch.isnan(t[-GUARD:])).any()


def _lse_buffers(shape: Shape, layout: str, device):
    """(flat LSE buffer, its coverage mask, the (B, H, Sq) view): rows contiguous (the contract); heads
    and batches strided in every layout but contiguous and bhsd."""
    b, sq, hq = shape.batch, shape.seqlen_q, shape.heads_q
    n = b * hq * (sq + (PAD if layout not in ("contiguous", "bhsd") else 0))
    flat = torch.empty(2 * GUARD + n, dtype=torch.float32, device=device)
    covered = torch.zeros(flat.shape, dtype=torch.bool, device=device)
    views = []
    for t in (flat, covered):
        inner = t[GUARD:GUARD + n]
        if layout == "contiguous":
            views.append(inner.view(b, hq, sq))
        elif layout == "bhsd":  # (H, B, S) storage
            views.append(inner.view(hq, b, sq).permute(1, 0, 2))
        else:                   # padded rows
            views.append(inner.view(b, hq, sq + PAD)[..., :sq])
    views[1].fill_(True)
    return flat, covered, views[0]


class FarStorage:
    """Q, K, V and O of one shape in a single buffer whose batches lie FAR_STRIDE elements apart
    (avo.harness.envelope): a kernel computing any offset in 32 bits reads and writes the wrong batch.
    Every segment is 64 elements aligned; NaN guard bands surround each batch's O; LSE lies in its own
    guarded buffer."""

    def __init__(self, shape: Shape, device="cuda"):
        b, sq, sk, hq, hkv, d = (shape.batch, shape.seqlen_q, shape.seqlen_k, shape.heads_q, shape.heads_kv,
                                 shape.head_dim)
        sizes = [sq * hq * d, sk * hkv * d, sk * hkv * d, GUARD, sq * hq * d, GUARD]
        offsets, at = [], 0
        for n in sizes:
            offsets.append(at)
            at += -(-n // 64) * 64
        if at > envelope.FAR_STRIDE:
            raise ValueError(f"{shape.key} does not fit the far layout's batch stride")
        self.buf = torch.empty(envelope.FAR_STRIDE * (b - 1) + at, dtype=torch.bfloat16, device=device)
        self.q, self.k, self.v, self.o = (
            self.buf.as_strided((b, s, h, d), (envelope.FAR_STRIDE, h * d, d, 1), offsets[i])
            for i, (s, h) in ((0, (sq, hq)), (1, (sk, hkv)), (2, (sk, hkv)), (4, (sq, hq))))
        self._bands = [self.buf.as_strided((b, GUARD), (envelope.FAR_STRIDE, 1), offsets[i]) for i in (3, 5)]
        self._lse, self._lse_in, self.lse = _lse_buffers(shape, "contiguous", device)
        self.poison()

    def poison(self) -> None:
        self.o.fill_(float("nan"))
        for band in self._bands:
            band.fill_(float("nan"))
        self._lse.fill_(float("nan"))

    def guards_broken(self) -> torch.Tensor:
        return torch.stack([(~torch.isnan(band)).any() for band in self._bands] + [_band_written(self._lse)]).any()


def draw(shape: Shape, gen: torch.Generator, dist: str = "normal", device="cuda"):
    """Contiguous (q, k, v) of a shape in one of DISTS, from `gen` (the same generator state, the same values)."""
    if dist not in DISTS:
        raise ValueError(f"unknown input distribution {dist!r}")
    b, sq, sk, hq, hkv, d = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.heads_q, shape.heads_kv, shape.head_dim

    def one(*size):
        x = torch.randn(*size, generator=gen, device=device)
        if dist == "outliers":
            spikes = torch.rand(x.shape, generator=gen, device=device) < 1e-3
            x = x + spikes * torch.randn(x.shape, generator=gen, device=device) * 10.0
        return x

    q, k, v = (one(*s) for s in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))
    if dist == "large":  # logits of about +-100 and more: exp without a running max overflows
        q.mul_(30.0)
    if dist == "wide":
        v.mul_(WIDE)
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def place(q, k, v, layout: str, shape: Shape):
    """(q, k, v, outputs): the inputs copied into the storage of `layout`, and outputs laid out alike."""
    if layout == FAR:
        far = FarStorage(shape, q.device)
        for dst, src in zip((far.q, far.k, far.v), (q, k, v), strict=True):
            dst.copy_(src)
        return far.q, far.k, far.v, far
    if layout == "packed":  # one (B, S, Hq + 2 Hkv, D) tensor, as a fused QKV projection writes it
        hq, hkv = q.shape[2], k.shape[2]
        if q.shape[1] == k.shape[1]:
            qkv = torch.cat([q, k, v], dim=2)
            views = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
        else:
            kv = torch.cat([k, v], dim=2)
            views = q.clone(), kv[:, :, :hkv], kv[:, :, hkv:]
    else:
        views = tuple(_strided(tuple(t.shape), layout, torch.bfloat16, q.device)[0] for t in (q, k, v))
        for dst, src in zip(views, (q, k, v), strict=True):
            dst.copy_(src)
    return (*views, Outputs(shape, q.device, layout))


def random_inputs(shape: Shape, gen: torch.Generator, dist: str = "normal", layout: str = "contiguous",
                  device="cuda"):
    """(q, k, v) in the given distribution and storage layout (not FAR: that needs its outputs too)."""
    return place(*draw(shape, gen, dist, device), layout, shape)[:3]


def random_scale(head_dim: int, gen: torch.Generator) -> float:
    """softmax_scale drawn from [0.5, 2] / sqrt(d): a kernel must read p.softmax_scale."""
    u = float(torch.rand(1, generator=gen, device=gen.device).item())
    return (0.5 + 1.5 * u) / math.sqrt(head_dim)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of BF16 numbers at |x| (8 significant bits: 2^(e - 8) for |x| in [2^(e-1), 2^e)); 0 at 0."""
    _, e = torch.frexp(x.abs())
    return torch.where(x == 0, torch.zeros_like(x), torch.ldexp(torch.ones_like(x), e - 8))


@dataclass
class Truth:
    """The FP32 reference on some rows (all if rows is None) and the tolerances BF16 itself implies."""
    o: torch.Tensor        # (B, R, H, D) FP32
    lse: torch.Tensor      # (B, H, R)
    rows: torch.Tensor | None
    tol: float             # err_mult * max|bf16 - truth| + atol
    row_tol: float         # err_mult * the worst row error of BF16, relative to the row's magnitude
    lse_bound: torch.Tensor | None = None  # (B, H, R): what an FP32 tensor-core accumulation may add to LSE

    def to(self, device) -> "Truth":
        rows = None if self.rows is None else self.rows.to(device)
        bound = None if self.lse_bound is None else self.lse_bound.to(device)
        return Truth(self.o.to(device), self.lse.to(device), rows, self.tol, self.row_tol, bound)


# A tensor core's FP32 accumulation of BF16 products is not IEEE FP32 summation: its error is relative to the
# sum of the products' magnitudes. LSE carries that error of the largest logits, and with logits of a few
# hundred it passes any fixed tolerance (seen on the H200: sm80 5.7e-3 and the first sm90 1.9e-3 against
# 1e-3, both 2^-16 of scale * sum |q_i k_i|). 2^-14 leaves a factor of four over the worst seen; at N(0, 1)
# inputs it adds about 5e-4 to the 1e-3 floor.
ACC_EPS = 2.0 ** -14


def logit_bound(q, k, scale: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, R): scale * max_j sum_i |q_i k_ji| over the keys j of each row, in chunks of (batch, head) pairs
    as attention_refs computes them."""
    b, hq, hkv = q.shape[0], q.shape[2], k.shape[2]
    qs = q if rows is None else q[:, rows]
    out = torch.empty(b * hq, qs.shape[1], dtype=torch.float32, device=q.device)
    for at, bi, h, kv in head_pairs(b, hq, hkv, k.shape[1] * max(qs.shape[1], q.shape[3]), q.device):
        out[at] = torch.matmul(qs[bi, :, h].float().abs_(), k[bi, :, kv].float().abs_().transpose(1, 2)).amax(-1)
    return scale * out.view(b, hq, -1)


def truth(q, k, v, causal: bool, err_mult: float, atol: float, rows: torch.Tensor | None = None,
          scale: float | None = None) -> Truth:
    ref_o, ref_lse, bf_o, _ = attention_refs(q, k, v, causal, scale, rows)
    lse_bound = ACC_EPS * logit_bound(q, k, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, rows)
    bf_diff = (bf_o - ref_o).abs()
    mag = ref_o.abs().amax(-1).clamp_min(1e-30)
    tol = err_mult * bf_diff.max().item() + atol
    row_tol = err_mult * (bf_diff.amax(-1) / mag).max().item()
    bf_o.zero_()  # a BF16 answer, freed next: no kernel finds it in memory afterwards
    return Truth(ref_o, ref_lse, rows, tol, row_tol, lse_bound)


def judge(o, lse, t: Truth, atol: float, lse_atol: float) -> tuple[bool, float, str]:
    """Compare full (o, lse) with the truth on its rows: (ok, max error, the first failure in one line)."""
    if t.rows is not None:
        o, lse = o[:, t.rows], lse[:, :, t.rows]
    if torch.isnan(o).any() or torch.isnan(lse).any():
        n = int(torch.isnan(o).sum()) + int(torch.isnan(lse).sum())
        return False, float("nan"), f"{n} output elements are NaN: not written, or computed as NaN"
    of = o.float()
    if torch.isinf(of).any():
        return False, float("inf"), "O contains Inf"
    diff = (of - t.o).abs()
    err = diff.max().item()
    # plus one BF16 ulp of each value: an honest kernel whose FP32 result lands near a rounding midpoint
    # rounds to the neighbouring BF16 number, which near the largest outputs can exceed err_mult times
    # the reference's own largest rounding error (seen: 1.44e-2 against 1.39e-2 where |O| is in [2, 4))
    ulp = bf16_ulp(t.o)
    over = diff > t.tol + ulp
    if over.any():
        worst = float((diff - ulp).max())
        return False, err, (f"max|O - ref| = {err:.3e} > tolerance {t.tol:.3e} (beyond one BF16 ulp of the value "
                            f"by up to {worst:.3e}, at {int(over.sum())} elements)")
    # per row, relative to the row's own magnitude: (B, rows, H)
    mag = t.o.abs().amax(-1).clamp_min(1e-30)
    rel = diff.amax(-1) / mag
    bad = rel > t.row_tol + atol / mag
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        return False, err, (f"{int(bad.sum())} query rows wrong relative to their own magnitude (worst "
                            f"{rel.max().item():.3e} > {t.row_tol:.3e}; first at flat index {i})")
    empty = torch.isneginf(t.lse)
    if not torch.equal(torch.isneginf(lse), empty):
        return False, err, "LSE must be -inf exactly for rows with no visible key, and finite elsewhere"
    if empty.any() and not bool((of.permute(0, 2, 1, 3)[empty] == 0).all()):
        return False, err, "rows with no visible key must have O = 0 exactly"
    if torch.isinf(lse[~empty]).any():
        return False, err, "LSE contains Inf"
    full = ~empty
    lse_tol = lse_atol + (t.lse_bound if t.lse_bound is not None else torch.zeros_like(t.lse))
    lse_diff = (lse - t.lse).abs()
    bad = full & ~(lse_diff <= lse_tol)
    if bad.any():
        worst = int((torch.where(full, lse_diff - lse_tol, torch.zeros_like(lse_diff))).flatten().argmax())
        return False, err, (f"max|LSE - ref| = {lse_diff[full].max().item():.3e} > tolerance "
                            f"{lse_tol.flatten()[worst].item():.3e} (the floor {lse_atol:.0e} plus what an FP32 "
                            f"tensor-core sum of the row's logits may add) at {int(bad.sum())} rows")
    return True, err, ""


def compare(o, lse, q, k, v, causal: bool, err_mult: float, atol: float, lse_atol: float,
            rows: torch.Tensor | None = None, scale: float | None = None) -> tuple[bool, float, str]:
    """Compare (o, lse) (full tensors) with the references on `rows` (all rows if None)."""
    return judge(o, lse, truth(q, k, v, causal, err_mult, atol, rows, scale), atol, lse_atol)
