"""SEARCH/REPLACE edits, full rewrites and diffs (pure logic)."""
import pytest

from avo.agent.edits import Edit, EditError, apply_edits, extract_source, parse_blocks, unified_diff
from avo.agent.tools import apply_tool_edit

SRC = """#define BLOCK_N 64  // @tunable 32 64 128
__global__ void f() {
    int a = 1;
    int b = 2;
    int a2 = 1;
}
"""


def test_exact_unique_edit():
    out = apply_edits(SRC, [Edit("    int b = 2;\n", "    int b = 3;\n")])
    assert "int b = 3;" in out and "int b = 2;" not in out
    assert out.count("\n") == SRC.count("\n")


def test_edits_apply_in_order_and_atomically():
    out = apply_edits(SRC, [Edit("int b = 2;", "int b = 5;"), Edit("int b = 5;", "int b = 6;")])
    assert "int b = 6;" in out
    with pytest.raises(EditError, match="edit 2 of 2"):
        apply_edits(SRC, [Edit("int b = 2;", "int b = 5;"), Edit("no such line", "x")])


def test_ambiguous_search_is_rejected():
    with pytest.raises(EditError, match="occurs 2 times"):
        apply_edits(SRC, [Edit("= 1;", "= 7;")])


def test_indentation_mismatch_is_tolerated():
    out = apply_edits(SRC, [Edit("int b = 2;\nint a2 = 1;", "    int b = 9;\n    int a2 = 9;")])
    assert "    int b = 9;\n    int a2 = 9;\n}" in out


def test_missing_search_names_the_closest_line():
    with pytest.raises(EditError, match="closest to 'int b = 2;'"):
        apply_edits(SRC, [Edit("int b = 4;", "int b = 5;")])


@pytest.mark.parametrize("edit,msg", [(Edit("", "x"), "empty"), (Edit("int b = 2;", "int b = 2;"), "identical")])
def test_degenerate_edits(edit, msg):
    with pytest.raises(EditError, match=msg):
        apply_edits(SRC, [edit])


def test_no_edits():
    with pytest.raises(EditError, match="no edit"):
        apply_edits(SRC, [])


def test_parse_blocks_from_free_text():
    text = ("Here is my change:\n<<<<<<< SEARCH\n    int b = 2;\n=======\n    int b = 8;\n>>>>>>> REPLACE\n"
            "and\n<<<<<<< SEARCH\nint a2 = 1;\n=======\nint a2 = 0;\n>>>>>>> REPLACE\n")
    blocks = parse_blocks(text)
    assert blocks == [Edit("    int b = 2;\n", "    int b = 8;\n"), Edit("int a2 = 1;\n", "int a2 = 0;\n")]
    out = apply_edits(SRC, blocks)
    assert "int b = 8;" in out and "int a2 = 0;" in out


def test_extract_source_takes_the_kernel_block():
    text = "x\n```cuda\nint tiny;\n```\n```cuda\nextern \"C\" __global__ void avo_attention() {}\n```\n"
    assert extract_source(text).startswith('extern "C" __global__ void avo_attention')
    assert extract_source("no code here") is None


def test_rewrite_requires_a_complete_kernel():
    with pytest.raises(EditError, match="AVO_LAUNCH"):
        apply_tool_edit(SRC, "rewrite", {"source": "int main() {}"})
    full = "AVO_LAUNCH(32, 0, 1, 0, 0, 0);\nextern \"C\" __global__ void avo_attention() {}"
    assert apply_tool_edit(SRC, "rewrite", {"source": full}) == full + "\n"


def test_unified_diff():
    d = unified_diff(SRC, SRC.replace("= 2", "= 3"), "v1", "current")
    assert "--- v1" in d and "-    int b = 2;" in d and "+    int b = 3;" in d
    assert unified_diff(SRC, SRC) == "(no difference)"
