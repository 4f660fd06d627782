"""The two gates on what may be compiled and run: the source's preprocessor directives (lexed as the
compiler does) and the PTX NVRTC produced (whatever the spelling). Real NVRTC, no GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

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


def test_ptx_gate_accepts_the_seeds_constant_tables_and_printf_when_checking():
    for name in ("naive", "sm80", "sm90"):
        assert check_ptx(_ptx_of((ROOT / "kernels_cuda" / name / f"{name}.cu").read_text())) is None, name
    table = NAIVE.replace("AVO_LAUNCH(", "__constant__ float tbl[4] = {1, 2, 3, 4};\nAVO_LAUNCH(").replace(
        RET, f"  if (tbl[row & 3] == 9.f) return;\n{RET}")
    assert check_ptx(_ptx_of(table)) is None
    printf = NAIVE.replace(RET, f'  if (row == 123456) printf("x");\n{RET}')
    assert check_ptx(_ptx_of(printf), allow_printf=True) is None


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
