"""The two gates on what may be compiled and run: the source's preprocessor directives (lexed as the
compiler does) and the PTX NVRTC produced (parsed into statements, whatever the spelling), plus the
bound on local memory per thread. Real NVRTC, no GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

from avo.harness.ptx import PtxSyntaxError, declaration, statements
from avo.harness.ptxgate import check_ptx
from avo.harness.static import check_source, lex

ROOT = Path(__file__).resolve().parents[1]
NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()
RET = "  if (row >= p.seqlen_q) return;"


@pytest.mark.parametrize("snippet", [
    '#include "/etc/passwd"',
    "#include <avo/../../../../etc/passwd>",
    '#include "cuda/../../../etc/passwd"',
    "#define F <avo/attention.cuh>\n#include F",
    '#inc\\\nlude "/etc/passwd"',
    '#\\\ninclude "/etc/passwd"',
    '%:include "/etc/passwd"',
    '# /* c */ include "/etc/passwd"',
    '??=include "/etc/passwd"',
    '#if __has_include("/etc/passwd")\n#endif',
    '#include_next <cuda_bf16.h>',
    '#import "/etc/passwd"',
    "#include <stdio.h>",
])
def test_directives_that_could_read_a_host_file_are_refused(snippet):
    why = check_source(NAIVE + "\n" + snippet + "\n")
    last = NAIVE.count(chr(10)) + 1 + snippet.count(chr(10)) + 1  # the snippet's last line: where the directive is
    assert why is not None and why.startswith((f"line {last}:", f"line {last - 1}:")), why


def test_lexing_keeps_strings_and_raw_strings_out_of_directives():
    src = ('#include <avo/attention.cuh>\n#include <cuda/std/cstdint>\n'
           'const char* s = "#include </etc/passwd> // not a comment";\n'
           'const char* r = R"x(\n#include "/etc/passwd"\n)x";\nint big = 1\'000\'000;\n')
    assert check_source(src) is None
    code, with_strings = lex(src)
    assert len(code) == len(with_strings) and code.count("\n") == src.count("\n")
    assert "/etc/passwd" not in code and "/etc/passwd" in with_strings


def test_unterminated_comment_is_one_line():
    assert check_source("int x; /* never closed").startswith("line 1: unterminated")


def _ptx_of(source: str, printf: bool = False) -> str:
    pytest.importorskip("cuda.core")
    from avo.harness.nvrtc import compile_source

    c = compile_source(source, "sm_90a", 128)
    assert c.ok, c.log
    return c.ptx


@pytest.mark.parametrize("decl, body, words", [
    ("", '  unsigned long long t; asm volatile("mov.u64 %0, %%glob" "altimer;" : "=l"(t)); if (t == 1) return;',
     "clock or timer"),
    ("#define CAT(a, b) a##b", "  if (CAT(clo, ck64)() == 1) return;", "clock or timer"),
    ("", '  asm volatile("nano" "sleep.u32 100;");', "nanosleep"),
    ("#define CAT(a, b) a##b", "  if (CAT(mal, loc)(16) == nullptr) return;", "malloc"),
    ("__device__ int hits;", "  atomicAdd(&hits, 1);", "writable module variable `hits`"),
    ("static __device__ float4 keep;", "  keep.x += 1.f;", "writable module variable `keep`"),
    ("", '  if (row == 123456) printf("x");', "printf"),
])
def test_ptx_gate_judges_what_was_compiled(decl, body, words):
    src = NAIVE.replace("AVO_LAUNCH(", f"{decl}\nAVO_LAUNCH(").replace(RET, f"{body}\n{RET}")
    why = check_ptx(_ptx_of(src))
    assert why is not None and words in why, why


# Each hides what the line-by-line gate could not see: an instruction inside a `{ }` block, after a named
# predicate or second on a line; a declaration inside a block; module memory reached some other way.
ATTACKS = {  # name: (declaration, body, words of the refusal)
    "timer in a block": (
        "", '  unsigned long long t; asm volatile("{ mov.u64 %0, %%globaltimer; }" : "=l"(t)); if (t == 1) return;',
        "clock or timer"),
    "clock after a named predicate": (
        "", '  unsigned long long t = 0; asm volatile("{ .reg .pred q; setp.eq.u32 q, 1, 1; '
            '@q mov.u64 %0, %%clock64; }" : "+l"(t)); if (t == 1) return;',
        "clock or timer"),
    "clock second on a line": (
        "", '  unsigned a, t; asm volatile("mov.u32 %0, 0; mov.u32 %1, %%clock;" : "=r"(a), "=r"(t)); '
            "if (t == a + 1) return;",
        "clock or timer"),
    "sleep after a named predicate": (
        "", '  asm volatile("{ .reg .pred q; setp.eq.u32 q, 1, 1; @q nanosleep.u32 100; }");', "nanosleep"),
    "brkpt second on a line": ("", '  asm volatile("mov.u32 %0, %0; brkpt;" :: "r"(row));', "brkpt"),
    ".global inside a block": (
        "", '  unsigned x; asm volatile("{ .global .align 4 .u32 cnt; atom.global.add.u32 %0, [cnt], 1; }" '
            ': "=r"(x)); if (x == 5) return;',
        "`.global cnt` inside a block"),
    "managed memory": (
        "__managed__ unsigned calls;", "  if (atomicAdd(&calls, 1u) > 1000u) return;", "managed memory `calls`"),
    "constant bank through a cast pointer": (
        "__constant__ unsigned seen[4];",
        '  unsigned long long a = (unsigned long long)&seen[0]; asm volatile("" : "+l"(a)); '
        "if (atomicAdd((unsigned*)a, 1u) > 1000u) return;",
        "__constant__ address into a generic"),
    "a store into avo_launch": (
        "", "  int* w = const_cast<int*>(avo_launch); if (atomicAdd(w + 6, 1) > 1000) return;",
        "`avo_launch` other than as the address of a load"),
    "avo_launch's address in asm": (
        "", '  unsigned long long a; asm volatile("{ .reg .u64 t; mov.u64 t, avo_launch; cvta.global.u64 %0, t; }" '
            ': "=l"(a)); if (atomicAdd((int*)a + 6, 1) > 9) return;',
        "`avo_launch` other than as the address of a load"),
    "%smid": ("", '  unsigned s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); if (s == 999) return;', "`%smid`"),
    "%gridid": (
        "", '  unsigned long long s; asm volatile("mov.u64 %0, %%gridid;" : "=l"(s)); if (s == 999) return;',
        "`%gridid`"),
    "%envreg": (
        "", '  unsigned s; asm volatile("mov.u32 %0, %%envreg3;" : "=r"(s)); if (s == 999) return;',
        "environment register"),
    "%pm0": (
        "", '  unsigned s; asm volatile("mov.u32 %0, %%pm0;" : "=r"(s)); if (s == 999) return;',
        "performance-monitor counter"),
    "alloca": (
        "", '  unsigned long long a; asm volatile("alloca.u64 %0, 64;" : "=l"(a)); if (a == 1) return;', "alloca"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_ptx_gate_judges_every_statement_wherever_it_sits(name):
    decl, body, words = ATTACKS[name]
    src = NAIVE.replace("AVO_LAUNCH(", f"{decl}\nAVO_LAUNCH(").replace(RET, f"{body}\n{RET}")
    why = check_ptx(_ptx_of(src))
    assert why is not None and words in why, why


def test_ptx_is_split_into_statements_blocks_and_labels():
    ptx = """.version 9.5
.target sm_90a
.address_size 64
.global .align 4 .b8 avo_launch[32] = {128, 0, 0, 0};  // an initialiser is no block
.visible .entry avo_attention(.param .b64 p) .maxntid 128, 1, 1
{
  .reg .b32 %r<4>; .reg .pred %p<2>;
  mov.u32 %r1, %tid.x; /* ; inside a comment */ add.s32 %r2, %r1, 1;
L1: { .reg .pred q; setp.eq.u32 q, %r1, 0; @!q bra L1; }
  mov.b64 {%r1, %r2}, %rd1;
  call.uni (retval0),
    vprintf,
    (param0);
}
"""
    sts = statements(ptx)
    kinds = [(s.kind, s.depth, s.op or s.text) for s in sts]
    assert kinds[:4] == [("directive", 0, ".version"), ("directive", 0, ".target"), ("directive", 0, ".address_size"),
                         ("directive", 0, ".global")]
    assert ("instruction", 1, "add.s32") in kinds and ("label", 1, "L1") in kinds
    guarded = next(s for s in sts if s.guard)
    assert (guarded.guard, guarded.op, guarded.depth, guarded.text) == ("q", "bra", 2, "@!q bra L1")
    assert next(s for s in sts if s.op == "mov.b64").operands == "{%r1, %r2}, %rd1"
    assert next(s for s in sts if s.op == "call.uni").operands == "(retval0), vprintf, (param0)"
    decl = declaration(sts[3])
    assert (decl.space, decl.names, decl.initialised) == (".global", ["avo_launch"], True)
    assert declaration(next(s for s in sts if s.text.startswith(".reg .b32"))).ranges == {"%r": 4}
    with pytest.raises(PtxSyntaxError, match="never closed"):
        statements("{ mov.u32 %r1, 0;")
    assert "cannot be parsed" in check_ptx("}")


@pytest.mark.parametrize("ptx, words", [
    (".version 9.5\n.section .debug_info { .b8 1 }", "`.section`"),
    (".version 9.5\n.global .texref tex;", "texture, surface or sampler"),
    (".version 9.5\n.entry f() { .reg .b32 %clock; mov.u32 %clock, 1; }", "named like the special register"),
    (".version 9.5\n.extern .global .u32 elsewhere;", "defined outside the module"),
    (".version 9.5\n.global .align 4 .b8 avo_launch[32] = {1};\n.global .align 4 .b8 avo_launch[32] = {1};",
     "writable module variable `avo_launch`"),
    (".version 9.5\n.entry f() { call.uni nowhere, (); }", "`nowhere`, a function it does not define"),
    (".version 9.5\n.entry f() { .reg .b32 %r<2>; mov.u32 %r1, %nsmid; }", "`%nsmid`"),
    # recursion, which NVRTC 13.0's ptxas reports as a plain stack frame: self, mutual, and a call through a register
    (".version 9.5\n.func g();\n.func g() { call.uni g, (); }\n.entry f() { call.uni g, (); }",
     "calls `g` recursively, so its stack size cannot be bounded"),
    (".version 9.5\n.func h();\n.func g() { call.uni h, (); }\n.func h() { call.uni g, (); }\n"
     ".entry f() { call.uni g, (); }", "recursively, so its stack size cannot be bounded"),
    (".version 9.5\n.entry f() { .reg .b64 %rd<2>; call.uni %rd1, (), proto; }", "an indirect call"),
])
def test_ptx_gate_rules_on_hand_written_ptx(ptx, words):
    why = check_ptx(ptx)
    assert why is not None and words in why, why


def test_local_memory_per_thread_is_bounded():
    """400 KB of local memory per thread reserves over 100 GB of device memory on an H100; a stack ptxas
    cannot bound (recursion) is refused too. The seeds fit the default bound (sm80 uses 80 bytes)."""
    pytest.importorskip("cuda.core")
    from avo.config import HarnessConf
    from avo.harness.nvrtc import compile_candidate

    bound = HarnessConf.max_local_bytes
    big = NAIVE.replace(RET, f"  volatile char buf[400000]; buf[row % 400000] = 1; if (buf[(row * 7) % 400000] == 3) "
                             f"return;\n{RET}")
    c = compile_candidate(big, "sm_90a", 128, max_local_bytes=bound)
    assert not c.ok and "uses 400000 bytes of local memory per thread" in c.error
    assert f"harness.max_local_bytes={bound}" in c.error
    rec = NAIVE.replace("AVO_LAUNCH(", "__device__ __noinline__ int rec(int n, volatile int* d) {\n"
                                       "  if (n <= 0) return 0; d[n & 7] = n; return rec(n - 1, d) + rec(n - 2, d); }\n"
                                       "AVO_LAUNCH(")
    rec = rec.replace(RET, f"  volatile int d[8]; if (rec(row, d) == -1) return;\n{RET}")
    c = compile_candidate(rec, "sm_90a", 128, max_local_bytes=bound)
    assert not c.ok and "cannot be bounded" in c.error
    for name in ("naive", "sm80", "sm90"):
        c = compile_candidate((ROOT / "kernels_cuda" / name / f"{name}.cu").read_text(), "sm_90a", 128,
                              max_local_bytes=bound)
        assert c.ok and c.stack_bytes <= bound, (name, c.error)


def test_ptx_gate_accepts_the_seeds_constant_tables_and_printf_when_checking():
    for name in ("naive", "sm80", "sm90"):
        assert check_ptx(_ptx_of((ROOT / "kernels_cuda" / name / f"{name}.cu").read_text())) is None, name
    table = NAIVE.replace("AVO_LAUNCH(", "__constant__ float tbl[4] = {1, 2, 3, 4};\nAVO_LAUNCH(").replace(
        RET, f"  if (tbl[row & 3] == 9.f) return;\n{RET}")
    assert check_ptx(_ptx_of(table)) is None
    printf = NAIVE.replace(RET, f'  if (row == 123456) printf("x");\n{RET}')
    assert check_ptx(_ptx_of(printf), allow_printf=True) is None
    # inline asm with its own scopes, vector operands and predicates, as the sm90 seed writes it
    scoped = NAIVE.replace(RET, '  unsigned a = row, c = 2; asm volatile("{ .reg .b64 t; .reg .pred q; '
                                'mov.b64 t, {%0, %1}; setp.ne.u32 q, %0, 0; @q mov.b64 {%1, %0}, t; }" '
                                f': "+r"(a), "+r"(c)); if (a == c) return;\n{RET}')
    assert check_ptx(_ptx_of(scoped)) is None


def test_launch_geometry_is_validated_once_for_host_and_exports():
    pytest.importorskip("cuda.core")
    from avo.harness.nvrtc import compile_source

    src = NAIVE.replace("AVO_LAUNCH(ROWS_PER_BLOCK * 32,", "AVO_LAUNCH(ROWS_PER_BLOCK * 32 + 1,")
    c = compile_source(src, "sm_90a", 128)
    assert not c.ok and c.error == "threads=129: need a multiple of 32 in [32, 1024]"


def test_a_compile_error_names_its_first_diagnostic():
    pytest.importorskip("cuda.core")
    from avo.contract import set_tunables
    from avo.harness.nvrtc import compile_source

    src = set_tunables((ROOT / "kernels_cuda" / "sm90" / "sm90.cu").read_text(),
                       {"PRODUCER_REGS": "40", "CONSUMER_REGS": "240"})
    c = compile_source(src, "sm_90a", 128)
    assert not c.ok and c.error.startswith("compile error: candidate.cu(") and "[register pool]" in c.error
