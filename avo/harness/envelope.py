"""What the verify stage covers, which is what an exported op accepts (avo.export): one home for both.

The checks run rows up to `longest(...)` keys and queries (longer than any benchmark row, at least
LONG_MIN) and place batches FAR_STRIDE elements apart in one buffer (avo.harness.check.FAR). A
32-bit offset of any kind (signed or not, in elements or in bytes) overflows at or below 2^31
elements, except an unsigned element offset, which holds below 2^32: so offsets below
VERIFIED_OFFSETS elements are verified. No torch here: `python -m avo.export` reads it on any machine.
"""
from __future__ import annotations

LONG_MIN = 32768          # the shortest "long" row checked, whatever the benchmark's lengths
FAR_STRIDE = 2**31 + 64   # elements between batches in the far layout: > 2^31 elements, > 2^32 bytes
VERIFIED_OFFSETS = 2**32  # element offsets an exported op accepts: below this


def longest(bench_lengths) -> int:
    """The longest rows the checks run: longer than any benchmark row, odd, and at least LONG_MIN."""
    return max([LONG_MIN, *bench_lengths]) + 3


def envelope(bench_lengths) -> dict:
    """The exported op's limits for kernels verified with these benchmark lengths."""
    return {"max_seqlen": longest(bench_lengths), "max_offset": VERIFIED_OFFSETS}
