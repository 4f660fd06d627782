"""What an exported op accepts is what the harness verified, and it compiles as the harness does.

The package is imported in a child process where importing avo fails; inputs go through the op's fake
(meta) implementation, which needs no GPU, so tensors far past 2^32 elements cost nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from avo.export import export
from avo.harness import envelope
from tests.test_export import CHILD as EXPORT_CHILD

ROOT = Path(__file__).resolve().parents[1]

# the package imported where importing avo fails, as tests/test_export.py does it
PREAMBLE = EXPORT_CHILD[:EXPORT_CHILD.index("import pkg\n") + len("import pkg\n")]
CHILD = PREAMBLE + r"""
env = pkg.metadata()["envelope"]
def bf16(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16, device="cuda")

def refused(match, *args):
    try:
        pkg.attention_with_lse(*args)
    except pkg.UnsupportedError as e:
        assert match in str(e), (match, str(e))
        print("refused |", e)
        return
    raise AssertionError(f"accepted what was never verified: {match}")

with FakeTensorMode():
    n = env["max_seqlen"]
    out, lse = pkg.attention_with_lse(bf16(1, n, 1, 128), bf16(1, n, 1, 128), bf16(1, n, 1, 128))  # the longest checked
    refused(f"verified on rows of up to {n}", bf16(1, n + 1, 1, 128), bf16(1, 17, 1, 128), bf16(1, 17, 1, 128))
    refused(f"verified on rows of up to {n}", bf16(1, 17, 1, 128), bf16(1, n + 1, 1, 128), bf16(1, n + 1, 1, 128))
    far = torch.empty_strided((2, 17, 1, 128), (env["max_offset"], 128, 128, 1), dtype=torch.bfloat16, device="cuda")
    refused(f"offsets below {env['max_offset']}", far, bf16(2, 17, 1, 128), bf16(2, 17, 1, 128))
    near = torch.empty_strided((2, 17, 1, 128), (2**31 + 64, 128, 128, 1), dtype=torch.bfloat16, device="cuda")
    pkg.attention_with_lse(near, bf16(2, 17, 1, 128), bf16(2, 17, 1, 128))  # past 2^31: what the checks ran
print("ok")
"""


def test_the_exported_op_accepts_what_the_checks_covered_and_nothing_more(tmp_path):
    export("naive", tmp_path / "pkg", head_dims=[128], log=lambda s: None)
    meta = json.loads((tmp_path / "pkg" / "avo_export.json").read_text())
    assert meta["envelope"] == {"max_seqlen": envelope.longest([32768]), "max_offset": 2**32}
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), r.stdout + r.stderr
    assert r.stdout.count("refused |") == 3


def test_the_exported_op_compiles_through_the_abi_modules_nvrtc_path():
    """One compile path: the op calls the copied ABI module's options and NVRTC call, as the harness does."""
    op = (ROOT / "avo" / "export_template" / "op.py").read_text()
    harness = (ROOT / "avo" / "harness" / "nvrtc.py").read_text()
    for text in (op, harness):
        assert "compile_options(" in text and "nvrtc_compile(" in text
        assert "nvrtcCompileProgram" not in text and "-std=c++17" not in text
