"""The kernel variant from config: shapes to check and shapes to time."""
from __future__ import annotations

from avo.types import Problem, Shape

# Head dims the kernel contract covers (the harness, its references and `avo.export` handle each).
HEAD_DIMS = (64, 128, 256)


def problem_from_cfg(k) -> Problem:
    common = dict(heads_q=int(k.heads_q), heads_kv=int(k.heads_kv), head_dim=int(k.head_dim))
    bench = tuple(Shape(batch=int(k.bench.tokens) // int(s), seqlen_q=int(s), seqlen_k=int(s), causal=bool(c), **common)
                  for s in k.bench.seqlens for c in k.bench.causal)
    check = tuple(Shape(batch=int(k.check.batch), seqlen_q=int(sq), seqlen_k=int(sk), causal=bool(c), **common)
                  for sq, sk in k.check.seqlens for c in k.check.causal)
    return Problem(str(k.name), bench=bench, check=check, **common)
