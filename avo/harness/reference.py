"""Reference attention (FP32 upcast and same-precision BF16) and the SDPA baselines. Worker-side."""
from __future__ import annotations

import math

import torch


def attention_refs(q, k, v, causal: bool, scale: float | None = None, rows: torch.Tensor | None = None,
                   heads_per_chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse, o_bf16, lse_bf16) for (B, S, H, D) inputs, following CONTRACT.md (bottom-right causal, GQA).

    o, lse: the ground truth, everything in FP32 (TF32 off). o_bf16, lse_bf16: what a BF16 kernel
    unavoidably computes: the same exact FP32 logits (BF16 products are exact in FP32), P rounded
    to BF16 before P·V, the output rounded to BF16. One pass computes both, so the tolerance that
    follows from the precision costs no second attention.
    rows: optional query-row indices; only those rows are computed (for checks at full size).
    A row with no visible key gets o = 0 and lse = -inf.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    row_idx = rows if rows is not None else torch.arange(sq, device=q.device)
    qs = q[:, row_idx]
    n = len(row_idx)
    out, out_bf = (torch.empty(b, n, hq, d, dtype=torch.float32, device=q.device) for _ in range(2))
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    mask = None
    if causal:
        keys = torch.arange(sk, device=q.device)
        mask = keys[None, :] > (row_idx[:, None] + sk - sq)  # True = hidden
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for bi in range(b):
            for h0 in range(0, hq, heads_per_chunk):
                hs = slice(h0, min(h0 + heads_per_chunk, hq))
                kv_heads = torch.arange(hs.start, hs.stop, device=q.device) // group
                qh = qs[bi, :, hs].transpose(0, 1).float()           # (h, r, d)
                kh = k[bi][:, kv_heads].transpose(0, 1).float()      # (h, sk, d)
                vh = v[bi][:, kv_heads].transpose(0, 1).float()
                s = torch.matmul(qh, kh.transpose(1, 2)) * scale
                if mask is not None:
                    s.masked_fill_(mask, float("-inf"))
                m = s.amax(dim=-1, keepdim=True)
                m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
                p = torch.exp(s - m_safe)
                denom = p.sum(dim=-1, keepdim=True)
                lse[bi, hs] = (torch.log(denom) + m_safe).squeeze(-1)
                p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
                out[bi, :, hs] = torch.matmul(p, vh).transpose(0, 1)
                o_bf = torch.matmul(p.bfloat16().float(), vh).bfloat16().float()
                out_bf[bi, :, hs] = o_bf.transpose(0, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out, lse, out_bf, lse


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
