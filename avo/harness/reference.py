"""Reference attention (FP32 upcast and same-precision BF16) and the SDPA baselines. Worker-side."""
from __future__ import annotations

import math

import torch

# Elements of one chunk's largest FP32 temporary: the logits of a few (batch, head) pairs at full rows (three
# of 4097 x 4097), or every pair of a benchmark shape at its sampled rows, which was 128 pairs at 4k launched
# one by one (their ~2500 small launches, not the arithmetic, were what a truth cost).
PAIR_BUDGET = 2 ** 26


def head_pairs(b: int, hq: int, hkv: int, per_pair: int, device, budget: int = PAIR_BUDGET):
    """Chunks of the B * Hq (batch, query head) pairs in order, each at most `budget` elements of `per_pair`:
    yields (pair slice, batch index, query head, KV head) as index tensors (GQA: query head // group)."""
    p = torch.arange(b * hq, device=device)
    bi, h = p // hq, p % hq
    kv = h // (hq // hkv)
    n = max(1, budget // per_pair)
    for c0 in range(0, b * hq, n):
        yield slice(c0, c0 + n), bi[c0:c0 + n], h[c0:c0 + n], kv[c0:c0 + n]


def attention_refs(q, k, v, causal: bool, scale: float | None = None, rows: torch.Tensor | None = None,
                   budget: int = PAIR_BUDGET) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse, o_bf16, lse_bf16) for (B, S, H, D) inputs, following CONTRACT.md (bottom-right causal, GQA).

    o, lse: the ground truth, everything in FP32 (TF32 off). o_bf16, lse_bf16: what a BF16 kernel
    unavoidably computes: the same exact FP32 logits (BF16 products are exact in FP32), P rounded
    to BF16 before P·V, the output rounded to BF16. One pass computes both, so the tolerance that
    follows from the precision costs no second attention.
    rows: optional query-row indices; only those rows are computed (for checks at full size).
    A row with no visible key gets o = 0 and lse = -inf. (batch, head) pairs are computed in batched
    chunks of at most `budget` elements (head_pairs).
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    row_idx = rows if rows is not None else torch.arange(sq, device=q.device)
    qs = q[:, row_idx]
    n = len(row_idx)
    # per pair (B * Hq, rows, D), made (B, rows, H, D) at the end
    out, out_bf = (torch.empty(b * hq, n, d, dtype=torch.float32, device=q.device) for _ in range(2))
    lse = torch.empty(b * hq, n, dtype=torch.float32, device=q.device)
    mask = None
    if causal:
        keys = torch.arange(sk, device=q.device)
        mask = keys[None, :] > (row_idx[:, None] + sk - sq)  # True = hidden
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for at, bi, h, kv in head_pairs(b, hq, hkv, sk * max(n, d), q.device, budget):
            qh = qs[bi, :, h].float()                                # (pairs, r, d)
            kh, vh = k[bi, :, kv].float(), v[bi, :, kv].float()      # (pairs, sk, d)
            s = torch.matmul(qh, kh.transpose(1, 2)).mul_(scale)
            if mask is not None:
                s.masked_fill_(mask, float("-inf"))
            m = s.amax(dim=-1, keepdim=True)
            m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = s.sub_(m_safe).exp_()
            denom = p.sum(dim=-1, keepdim=True)
            lse[at] = (torch.log(denom) + m_safe).squeeze(-1)
            p.div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
            out[at] = torch.matmul(p, vh)
            out_bf[at] = torch.matmul(p.bfloat16().float(), vh).bfloat16().float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    o, o_bf = (t.view(b, hq, n, d).transpose(1, 2).contiguous() for t in (out, out_bf))
    lse = lse.view(b, hq, n)
    return o, lse, o_bf, lse


# -- baselines: torch SDPA backends on the same (B, S, H, D) tensors -----------------------------
BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}
REFERENCE = "flash"  # the baseline whose outputs (O and LSE) every timed candidate output is checked against


def sdpa_baseline(name: str, q, k, v, causal: bool, scale=None):
    """A zero-argument callable running one SDPA backend on transposed views (no copies).

    `scale`: a float, or a zero-argument callable read at every call (it changes per iteration).
    The call returns (o as a (B, S, H, D) view, lse (B, H, S) or None). "flash" goes through
    the FlashAttention-2 op itself, which writes the LSE anyway; "cudnn" through the public SDPA
    entry, exactly what users call. GQA uses enable_gqa (the same KV bytes as the candidate).
    Raises RuntimeError when the backend cannot run this shape here.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, BACKENDS[name])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    get_scale = scale if callable(scale) else (lambda: scale)

    def run_cudnn():
        with sdpa_kernel(backend):
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa,
                                                                 scale=get_scale())
        return o.transpose(1, 2), None

    def run_flash():
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False,
                                                                     scale=get_scale())[:2]
        return o.transpose(1, 2), lse

    run = run_flash if name == "flash" else run_cudnn
    run()  # raises here, not inside the timing loop, if the backend refuses the shape
    return run
