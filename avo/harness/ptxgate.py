"""The gate on what was compiled: the PTX NVRTC produced, not the spelling of the source.

NVRTC turns the candidate into PTX, and ptxas turns only that PTX into machine code, so every
instruction the kernel can run appears here, however it was written (macros, string pasting
inside asm, raw PTX). A kernel may not:
- read a clock or timer, or sleep (the harness owns timing);
- call anything it does not define itself: device-side malloc/free, launches, streams, graphs
  and the device runtime are all external functions (printf only in the correctness mode);
- keep writable module-scope memory (`__device__` variables, string literals): state that
  survives a launch (use `__constant__` for tables and the harness's `p.tile_counter` for
  schedulers; printf and assert only in the correctness-only mode);
- signal the profiler or break into a debugger.
"""
from __future__ import annotations

import re

ALLOWED_GLOBALS = {"avo_launch"}  # the launch metadata the harness reads (CONTRACT.md)
_ALLOWED_EXTERN = {"__assertfail"}  # assert(): reached only on a bug, and then traps
_PRINTF = {"vprintf"}

_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"%(clock|clock64|clock_hi|globaltimer|globaltimer_lo|globaltimer_hi)\b"),
     "reads a clock or timer (timing is the harness's)"),
    (re.compile(r"%pm\d+(_64)?\b"), "reads a performance-monitor counter"),
    (re.compile(r"^\s*(@!?%\w+\s+)?nanosleep\b", re.M), "sleeps (nanosleep)"),
    (re.compile(r"^\s*(@!?%\w+\s+)?pmevent\b", re.M), "signals a performance-monitor event"),
    (re.compile(r"^\s*(@!?%\w+\s+)?brkpt\b", re.M), "breaks into a debugger (brkpt)"),
]
_EXTERN_FUNC = re.compile(r"^\s*\.extern\s+\.func\s+(?:\([^)]*\)\s*)?(\w+)", re.M)
_GLOBAL_VAR = re.compile(r"^\s*(?:\.(?:visible|weak|extern)\s+)?\.global\s+(?:\.align\s+\d+\s+)?(?:\.v\d\s+)?"
                         r"\.(?!align\b)\w+\s+([\w$]+)", re.M)


def check_ptx(ptx: str, allow_printf: bool = False) -> str | None:
    """None if the PTX passes; otherwise one line naming the first violation and the PTX line."""
    for pattern, why in _RULES:
        m = pattern.search(ptx)
        if m:
            return _where(ptx, m.start(), why)
    allowed = _ALLOWED_EXTERN | (_PRINTF if allow_printf else set())
    for m in _EXTERN_FUNC.finditer(ptx):
        if m.group(1) not in allowed:
            what = ("printf (allowed only in the correctness-only mode)" if m.group(1) in _PRINTF
                    else f"`{m.group(1)}`, a function it does not define (device runtime, malloc/free, launches)")
            return _where(ptx, m.start(), f"calls {what}")
    for m in _GLOBAL_VAR.finditer(ptx):
        if allow_printf and m.group(1).startswith(("$str", "__unnamed_")):
            continue  # printf's and assert's string literals, when debugging
        if m.group(1).startswith(("$str", "__unnamed_")):
            return _where(ptx, m.start(), "holds string literals (printf or assert), which are writable memory "
                                          "that outlives a launch; allowed only in the correctness-only mode")
        if m.group(1) not in ALLOWED_GLOBALS:
            return _where(ptx, m.start(), f"defines the writable module variable `{m.group(1)}` (state that "
                                          "outlives a launch); use __constant__ for tables, p.tile_counter "
                                          "for scheduling")
    return None


def _where(ptx: str, pos: int, why: str) -> str:
    start = ptx.rfind("\n", 0, pos) + 1
    end = ptx.find("\n", pos)
    line = ptx[start:end if end >= 0 else len(ptx)].strip()
    return f"the compiled PTX {why}: `{line[:120]}`"
