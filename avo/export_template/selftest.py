"""Check the exported kernel against PyTorch on this GPU: python -m <package>.selftest

Every supported head dim and GQA group, causal and not, lengths that are not multiples of a tile.
The output must be as close to an FP32 reference as PyTorch's own BF16 attention is (times 2, plus
a small absolute slack); the log-sum-exp within 1e-3. Exit status 1 on any failure.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from . import attention_with_lse, metadata

SHAPES = [(1, 1, 1), (2, 17, 17), (1, 300, 128), (1, 128, 300), (2, 1000, 1000)]  # (batch, seqlen_q, seqlen_k)


def reference(q, k, v, causal: bool, scale: float):
    """(out, lse) in FP32 of (B, S, H, D) inputs, keys visible iff j <= i + Sk - Sq."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = (t.repeat_interleave(hq // hkv, dim=1) for t in (kf, vf))
    s = qf @ kf.transpose(-1, -2) * scale
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vf).transpose(1, 2), lse


def run(heads_q: int = 8, seed: int = 0) -> bool:
    meta, ok = metadata(), True
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for d in meta["head_dims"]:
        for g in meta["groups"]:
            hq = max(heads_q, g) // g * g
            for (b, sq, sk) in SHAPES:
                for causal in (False, True):
                    q = torch.randn(b, sq, hq, d, device="cuda", generator=gen).bfloat16()
                    k, v = (torch.randn(b, sk, hq // g, d, device="cuda", generator=gen).bfloat16() for _ in "kv")
                    scale = 1 / math.sqrt(d)
                    out, lse = attention_with_lse(q, k, v, causal)
                    ref, ref_lse = reference(q, k, v, causal, scale)
                    sdpa = F.scaled_dot_product_attention(
                        *(t.transpose(1, 2) for t in (q, k, v)), is_causal=False, enable_gqa=True,
                        attn_mask=_mask(sq, sk, causal, q.device)).transpose(1, 2)
                    tol = 2 * (sdpa.float() - ref).nan_to_num(0.0).abs().max().item() + 1e-3
                    err = (out.float() - ref).abs().max().item()
                    finite = torch.isfinite(ref_lse)
                    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
                    good = err <= tol and lse_err <= 1e-3 and torch.equal(torch.isfinite(lse), finite)
                    ok &= good
                    print(f"{'ok  ' if good else 'FAIL'} d={d} group={g} b={b} sq={sq} sk={sk} causal={causal}: "
                          f"max err {err:.2e} (tolerance {tol:.2e}), lse err {lse_err:.1e}", flush=True)
    return ok


def _mask(sq: int, sk: int, causal: bool, device):
    if not causal:
        return None
    i = torch.arange(sq, device=device)[:, None]
    return torch.arange(sk, device=device)[None, :] <= i + sk - sq


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
