"""Source gate run before compiling: constructs that would let a kernel fool the timing.

Comments are stripped first, so a forbidden word in a comment is fine.
printf is rejected for timed evaluation (it serialises on a host buffer and floods the log)
but allowed in the correctness-only mode, where it is a debugging aid.
"""
from __future__ import annotations

import re

_RULES: list[tuple[str, str]] = [
    (r"\bcu(da)?Stream\w*|\bcudaStream_t\b", "creates or uses CUDA streams (all work must run in the launched grid)"),
    (r"<<<|\bcu(da)?Launch\w*|\bcudaGraph\w*", "launches other kernels (dynamic parallelism)"),
    (r"accessPolicyWindow|PersistingL2|cudaLimitPersisting|\bcu(da)?CtxSetLimit|\bcudaDeviceSetLimit",
     "changes L2 persistence or device limits"),
    (r"%globaltimer|\bglobaltimer\b|%clock|\bclock(64)?\s*\(|\b__nanosleep\b",
     "reads clocks or sleeps (timing must be the harness's)"),
    (r"\bexit\s*;|\bexit\s*\(", "calls exit"),
    (r"\bmalloc\s*\(|\bfree\s*\(|\bcudaMalloc\w*", "allocates device memory"),
    (r"#\s*include\s*[<\"](?!avo/|cuda_bf16|cuda_fp16|cuda/|cuda_pipeline|mma\.h|cooperative_groups|cuda_awbarrier"
     r"|cstdint|stdint\.h|climits|cfloat|type_traits|utility)",
     "includes a header outside the allowed set (avo/, cuda_bf16.h, cuda_fp16.h, cuda/*, cuda_pipeline*.h, "
     "mma.h, cooperative_groups*, cuda_awbarrier*.h, cstdint, climits, cfloat, type_traits, utility)"),
]
_PRINTF = (r"\bprintf\s*\(", "calls printf (allowed only in the correctness-only mode)")

# Only comments are stripped: string literals stay, since inline PTX (asm "...") is where
# %globaltimer or exit would hide.
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _strip(source: str) -> str:
    return _COMMENT.sub(lambda m: "\n" * m.group(0).count("\n") or " ", source)


def check_source(source: str, allow_printf: bool = False) -> str | None:
    """None if the source passes; otherwise one line naming the first violation and its line."""
    code = _strip(source)
    rules = _RULES if allow_printf else [*_RULES, _PRINTF]
    for pattern, why in rules:
        m = re.search(pattern, code)
        if m:
            line = code.count("\n", 0, m.start()) + 1
            return f"line {line}: `{m.group(0).strip()}` {why}"
    return None
