"""Reference attention (FP32 upcast and same-precision BF16) and the SDPA baselines. Worker-side."""
from __future__ import annotations

import math

import torch


def attention_ref(q, k, v, causal: bool, upcast: bool = True, rows: torch.Tensor | None = None,
                  heads_per_chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) for (B, S, H, D) inputs, following CONTRACT.md (bottom-right causal, GQA).

    upcast=True: everything in FP32 (TF32 off), the ground truth. upcast=False: Q·K and P·V as
    BF16 matmuls with P rounded to BF16, the error any BF16 kernel can be expected to have.
    rows: optional query-row indices; only those rows are computed (for checks at full size).
    A row with no visible key gets o = 0 and lse = -inf.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d)
    row_idx = rows if rows is not None else torch.arange(sq, device=q.device)
    qs = q[:, row_idx]
    dt = torch.float32 if upcast else q.dtype
    out = torch.empty(b, len(row_idx), hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, len(row_idx), dtype=torch.float32, device=q.device)
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
                qh = qs[bi, :, hs].transpose(0, 1).to(dt)            # (h, r, d)
                kh = k[bi][:, kv_heads].transpose(0, 1).to(dt)      # (h, sk, d)
                vh = v[bi][:, kv_heads].transpose(0, 1).to(dt)
                s = torch.matmul(qh, kh.transpose(1, 2)).float() * scale
                if mask is not None:
                    s.masked_fill_(mask, float("-inf"))
                m = s.amax(dim=-1, keepdim=True)
                m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
                p = torch.exp(s - m_safe)
                denom = p.sum(dim=-1, keepdim=True)
                lse[bi, hs] = (torch.log(denom) + m_safe).squeeze(-1)
                p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
                o = torch.matmul(p.to(dt), vh).float()               # (h, r, d)
                out[bi, :, hs] = o.transpose(0, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out, lse


# -- baselines: torch SDPA backends on the same (B, S, H, D) tensors -----------------------------
BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}


def sdpa_baseline(name: str, q, k, v, causal: bool):
    """A zero-argument callable running one SDPA backend on transposed views (no copies).

    GQA uses enable_gqa=True, so the baseline reads the same KV bytes as the candidate.
    Raises RuntimeError when the backend cannot run this shape here.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, BACKENDS[name])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)

    run()  # raises here, not inside the timing loop, if the backend refuses the shape
    return run
