"""The gate on what was compiled: the PTX NVRTC produced, judged statement by statement.

NVRTC turns the candidate into PTX, and ptxas turns only that PTX into machine code, so every
instruction the kernel can run appears here, however it was written (macros, string pasting
inside asm, raw PTX). The PTX is parsed (avo.harness.ptx) and every instruction and declaration
is judged, in any block, after any predicate, wherever it sits on a line. A kernel may not:
- read a special register outside an allowlist (thread, block and cluster indices and sizes,
  lane and warp ids, lane masks, shared-memory sizes): no clocks or timers (the harness owns
  timing), no performance counters, no %smid, %gridid or %envreg;
- sleep, signal the profiler, break into a debugger, or size its stack at run time (alloca);
- call anything it does not define itself: device-side malloc/free, launches, streams, graphs
  and the device runtime are all external functions (printf only in the correctness mode);
- keep state that outlives a launch: no writable memory of its own (`.global` variables,
  declared anywhere, managed or not; string literals outside the correctness mode), and the
  module's read-only memory is only ever read: `avo_launch` only as the direct address of a
  load, a `__constant__` table only by ld.const (its address may be formed, never turned into a
  generic pointer that could be stored through). The GPU worker also compares the module's
  memory before and after the launches (avo.harness.launch), for what no text can show;
- use texture or surface references, or PTX directives outside the ones NVRTC writes.
"""
from __future__ import annotations

import re

from avo.harness.abi import LAUNCH_SYMBOL
from avo.harness.ptx import PtxSyntaxError, Statement, declaration, function_name, identifiers, statements

_ALLOWED_EXTERN = {"__assertfail"}  # assert(): reached only on a bug, and then traps
_PRINTF = {"vprintf"}
_STRINGS = ("$str", "__unnamed_")   # printf's and assert's string literals

SPECIAL_REGISTERS = frozenset({
    "%tid", "%ntid", "%laneid", "%warpid", "%nwarpid", "%ctaid", "%nctaid",
    "%is_explicit_cluster", "%clusterid", "%nclusterid", "%cluster_ctaid", "%cluster_nctaid",
    "%cluster_ctarank", "%cluster_nctarank",
    "%lanemask_eq", "%lanemask_le", "%lanemask_lt", "%lanemask_ge", "%lanemask_gt",
    "%dynamic_smem_size", "%total_smem_size", "%aggr_smem_size", "%reserved_smem_offset_begin",
    "%reserved_smem_offset_end", "%reserved_smem_offset_cap", "%reserved_smem_offset_0", "%reserved_smem_offset_1",
})
_REFUSED = [  # special registers outside the allowlist, named in the refusal
    (re.compile(r"%(clock|clock64|clock_hi|globaltimer|globaltimer_lo|globaltimer_hi)$"),
     "reads a clock or timer (timing is the harness's)"),
    (re.compile(r"%pm\d+(_64)?$"), "reads a performance-monitor counter"),
    (re.compile(r"%envreg\d+$"), "reads an environment register"),
]
_SPECIAL_HINT = "thread, block and cluster indices and sizes, lane and warp ids, lane masks, shared-memory sizes"
_SPECIAL_FAMILY = re.compile(r"%(pm\d+(_64)?|envreg\d+|clock\w*|globaltimer\w*|smid|nsmid|gridid|current_graph_exec)$")
_OPCODES = {
    "nanosleep": "sleeps (nanosleep)",
    "pmevent": "signals a performance-monitor event",
    "brkpt": "breaks into a debugger (brkpt)",
    "alloca": "sizes its stack at run time (alloca): local memory per thread must be known when it is compiled",
}
DIRECTIVES = frozenset({
    ".version", ".target", ".address_size", ".file", ".loc", ".pragma", ".visible", ".extern", ".weak",
    ".common", ".entry", ".func", ".global", ".const", ".shared", ".local", ".param", ".reg", ".align",
    ".maxntid", ".reqntid", ".minnctapersm", ".maxnctapersm", ".maxnreg", ".noreturn", ".explicitcluster",
    ".reqnctapercluster", ".maxclusterrank", ".callprototype", ".calltargets", ".branchtargets", ".alias",
    ".abi_preserve", ".abi_preserve_control",
})
_HANDLES = re.compile(r"\.(texref|surfref|samplerref)\b")
_CALL_TARGET = re.compile(r"^\s*(?:\([^)]*\)\s*,\s*)?([%\w$]+)")


def check_ptx(ptx: str, allow_printf: bool = False) -> str | None:
    """None if the PTX passes; otherwise one line naming the first violation and its PTX statement."""
    try:
        sts = statements(ptx)
    except PtxSyntaxError as e:
        return f"the compiled PTX cannot be parsed ({e}); nothing that cannot be judged runs"
    module = _Module(sts, allow_printf)
    for st in sts:
        why = module.judge(st)
        if why:
            return f"the compiled PTX {why}: `{st.text[:120]}` (PTX line {st.line})"
    return None


def _on_cycles(calls: dict[str, set[str]]) -> set[str]:
    """The functions from which a chain of calls leads back to themselves."""
    def reach(f: str) -> set[str]:
        seen, todo = set(), list(calls.get(f, ()))
        while todo:
            g = todo.pop()
            if g not in seen:
                seen.add(g)
                todo.extend(calls.get(g, ()))
        return seen

    return {f for f in calls if f in reach(f)}


def _extern(st: Statement) -> bool:
    return re.search(r"(^|\s)\.extern\s", st.text) is not None


class _Module:
    """What the PTX declares (registers, module memory, functions), and the rules over each statement."""

    def __init__(self, sts: list[Statement], allow_printf: bool):
        self.allow_printf = allow_printf
        self.regs: set[str] = set()
        self.reg_ranges: set[str] = set()
        self.memory: dict[str, str] = {}  # .global and .const symbols -> their space
        self.defined: set[str] = set()    # functions with a body here
        self.externs: set[str] = set()    # functions declared .extern (each judged where it is declared)
        self.launch_seen = False
        calls: dict[str, set[str]] = {}  # function -> the functions its body calls
        current = ""  # the function whose body the statements are in
        for st in sts:
            d = declaration(st)
            if d is not None and d.space == ".reg":
                self.regs.update(d.names)
                self.reg_ranges.update(d.ranges)
            elif d is not None and d.space in (".global", ".const"):
                self.memory.update({n: d.space for n in d.names})
            f = function_name(st)
            if f is not None:
                (self.externs if _extern(st) else self.defined).add(f[1])
                if st.depth == 0:  # a header: the body that follows is this function's
                    current = "" if _extern(st) else f[1]
            elif st.kind == "instruction" and st.base == "call" and current:
                m = _CALL_TARGET.match(st.operands)
                calls.setdefault(current, set()).add(m.group(1) if m else "")
        self.recursive = _on_cycles(calls)

    def judge(self, st: Statement) -> str | None:
        if st.kind == "directive":
            return self._directive(st)
        if st.kind == "instruction":
            return self._instruction(st)
        return None

    # -- directives ------------------------------------------------------------------------------
    def _directive(self, st: Statement) -> str | None:
        if st.op not in DIRECTIVES:
            return f"holds the directive `{st.op}`, which NVRTC does not write for a kernel"
        if _HANDLES.search(st.text):
            return "declares a texture, surface or sampler reference (the harness binds none)"
        f = function_name(st)
        if f is not None:
            return self._external(f[1]) if _extern(st) else None
        d = declaration(st)
        if d is None:
            return None
        if d.space == ".reg":
            bad = [n for n in d.names if n in SPECIAL_REGISTERS or _SPECIAL_FAMILY.match(n)]
            bad += [p for p in d.ranges if _SPECIAL_FAMILY.match(p + "0") or p + "0" in SPECIAL_REGISTERS]
            return f"declares a register named like the special register `{bad[0]}`" if bad else None
        if d.space in (".tex", ".sreg"):
            return f"declares `{d.space}` variables"
        if d.space not in (".global", ".const"):
            return None  # .shared (per block), .local (per thread), .param: nothing outlives a launch
        if d.linkage == ".extern":
            return f"refers to memory defined outside the module (`.extern {d.space} {', '.join(d.names)}`)"
        if d.space == ".const":
            return None
        for name in d.names:
            why = self._global(name, d, st)
            if why:
                return why
        return None

    def _external(self, name: str) -> str | None:
        """A function declared .extern: one defined outside the module, which only the allowed ones may be."""
        if name in _ALLOWED_EXTERN or (self.allow_printf and name in _PRINTF):
            return None
        if name in _PRINTF:
            return "calls printf (allowed only in the correctness-only mode)"
        return f"calls `{name}`, a function it does not define (device runtime, malloc/free, launches)"

    def _global(self, name: str, d, st: Statement) -> str | None:
        if name.startswith(_STRINGS) and not d.attributes:
            if self.allow_printf:
                return None  # printf's and assert's strings, when debugging
            return ("holds string literals (printf or assert), which are writable memory that outlives a "
                    "launch; allowed only in the correctness-only mode")
        if any("managed" in a for a in d.attributes):
            return f"declares managed memory `{name}` (state that outlives a launch)"
        if st.depth > 0:
            return f"declares `.global {name}` inside a block: writable memory that outlives a launch"
        if name == LAUNCH_SYMBOL and d.initialised and not self.launch_seen:
            self.launch_seen = True
            return None
        return (f"defines the writable module variable `{name}` (state that outlives a launch); use __constant__ "
                "for tables, p.tile_counter for scheduling")

    # -- instructions ----------------------------------------------------------------------------
    def _instruction(self, st: Statement) -> str | None:
        if st.base in _OPCODES:
            return _OPCODES[st.base]
        for name in identifiers(st.operands) + ([st.guard] if st.guard else []):
            if name.startswith("%"):
                why = self._register(name)
            else:
                why = self._symbol(name, st)
            if why:
                return why
        if st.base == "cvta" and ".const" in st.op and ".to." not in st.op + ".":
            return ("turns a __constant__ address into a generic pointer, which could be stored through "
                    "(index the table directly)")
        if st.base == "call":
            m = _CALL_TARGET.match(st.operands)
            target = m.group(1) if m else ""
            if target and not target.startswith("%") and target not in self.defined and target not in self.externs:
                return f"calls `{target}`, a function it does not define (device runtime, malloc/free, launches)"
            # ptxas bounds a stack only without recursion, and NVRTC 13.0's does not always say it could not
            if not target or target.startswith("%"):
                return "makes an indirect call (through a register), so its stack size cannot be bounded"
            if target in self.recursive:
                return f"calls `{target}` recursively, so its stack size cannot be bounded"
        return None

    def _register(self, name: str) -> str | None:
        if name in self.regs or name in SPECIAL_REGISTERS:
            return None
        prefix = name.rstrip("0123456789")
        if prefix != name and prefix in self.reg_ranges:
            return None
        for pattern, why in _REFUSED:
            if pattern.match(name):
                return why
        return f"reads the special register `{name}`, outside what a kernel may read ({_SPECIAL_HINT})"

    def _symbol(self, name: str, st: Statement) -> str | None:
        space = self.memory.get(name)
        if space is None:
            return None
        if space == ".global" and self.allow_printf and name.startswith(_STRINGS):
            return None
        as_address = re.search(rf"\[\s*{re.escape(name)}\s*(\+\s*-?\d+\s*)?\]", st.operands) is not None
        uses = len(re.findall(rf"(?<![\w$%]){re.escape(name)}(?![\w$])", st.operands))
        if st.base in ("ld", "ldu") and as_address and uses == 1 and (space == ".global" or ".const" in st.op):
            return None  # a read at the symbol's own address
        if space == ".const" and st.base == "mov" and st.operands.split(",")[-1].strip() == name:
            return None  # the table's address in the constant window: only ld.const can use it
        what = "`avo_launch`" if name == LAUNCH_SYMBOL else f"the module's memory `{name}`"
        return (f"uses {what} other than as the address of a load (a store, an atomic, or its address "
                "taken): module memory is read-only to a kernel")
