"""sm90's declared tunable space: no combination may compile and then hang on the GPU.

Every combination either meets the validity rules or fails to compile with a static_assert that
names the broken rule. The rules block (kernels_cuda/sm90/sm90.cu, up to its end marker)
compiles on its own in a few hundredths of a second, so every combination is checked with
NVRTC; the rule-relevant valid combinations are also compiled in full.
"""
import pytest

from avo.contract import set_tunables, tunables
from avo.harness.nvrtc import compile_source
from avo.seeds import KERNELS_DIR
from tests.conftest import assert_rules_cover, broken_rules, rule_combinations, rules_block

SRC = (KERNELS_DIR / "sm90" / "sm90.cu").read_text()
RULES = rules_block(SRC)
TUNABLES = tunables(SRC)
# what the rules read
RULE_KEYS = ("STAGES", "PRODUCER_REGS", "CONSUMER_REGS", "BLOCK_N_FULL", "BLOCK_N_CAUSAL", "RESCALE_LOG2")
REGISTER_KEYS = RULE_KEYS[:3]
LAUNCH_REGS = 65536 // 384 // 8 * 8  # ptxas's cap for __launch_bounds__(384, 1): 168


def expected_violations(v: dict[str, str]) -> set[str]:
    """The rules restated from the PTX ISA (setmaxnreg) and Hopper's limits, independently of the kernel."""
    stages, prod, cons, bn_full, bn_causal, rescale = (int(v[k]) for k in RULE_KEYS)
    broken = set()
    if prod % 8 or not 24 <= prod <= LAUNCH_REGS:
        broken.add("producer regs")  # setmaxnreg.dec can only lower the launch count
    if cons % 8 or not LAUNCH_REGS <= cons <= 256:
        broken.add("consumer regs")  # setmaxnreg.inc can only raise it
    if prod + 2 * cons > 3 * LAUNCH_REGS:
        broken.add("register pool")  # the CTA's pool is what it launched with: .inc would wait forever
    if not {bn_full, bn_causal} <= {128, 176}:
        broken.add("block width")  # the wgmma wrappers the kernel has
    if not 0 <= rescale <= 16:
        broken.add("rescale")
    # Q (128 rows) + STAGES x (K + V) slots of the wider block width, 256 B a row at d128
    smem = 128 * 128 * 2 + stages * 2 * max(bn_full, bn_causal) * 128 * 2 + 256 + 1024
    if stages < 2 or smem > 227 * 1024:
        broken.add("shared memory")
    if 8 * (2 + 4 * stages) > 128:
        broken.add("mbarriers")
    return broken


def test_the_declared_space_is_what_the_rules_cover():
    assert_rules_cover(SRC, RULE_KEYS)


def test_every_declared_combination_meets_the_rules_or_names_the_one_it_breaks():
    rejected = set()
    for v in rule_combinations(TUNABLES, RULE_KEYS):
        c = compile_source(set_tunables(RULES, v), "sm_90a", 128)
        want = expected_violations(v)
        assert broken_rules(c.log) == want, f"{v}: expected {sorted(want) or 'valid'}\n{c.log[-1500:]}"
        assert c.ok == (not want), f"{v}: {c.error}\n{c.log[-1500:]}"
        if want:
            rejected.add(tuple(v[k] for k in RULE_KEYS[:5]))
    # the register pool rule rejects 32/240 and 40/240 at both stage counts (32/240 hung on an H200);
    # shared memory rejects 3 stages of 176-key blocks (296 KB)
    widths = ("128", "176")
    pool = {(s, p, "240", f, c) for s in ("2", "3") for p in ("32", "40") for f in widths for c in widths}
    wide = {("3", p, r, f, c) for p in ("24", "32", "40") for r in ("232", "240") for f in ("128", "176")
            for c in ("128", "176") if "176" in (f, c)}
    assert rejected == pool | wide
    assert not expected_violations({k: t.value for k, t in TUNABLES.items()}), "the defaults are valid"


def _widest_block_that_fits(v: dict[str, str]) -> dict[str, str]:
    """A register/stage combination with the widest key blocks its shared memory allows."""
    width = "176" if v["STAGES"] == "2" else "128"
    return {**v, "BLOCK_N_FULL": width, "BLOCK_N_CAUSAL": width}


VALID = [w for w in map(_widest_block_that_fits, rule_combinations(TUNABLES, REGISTER_KEYS))
         if not expected_violations({**{k: TUNABLES[k].value for k in RULE_KEYS}, **w})]


@pytest.mark.parametrize("v", VALID, ids=lambda v: "-".join(v.values()))
def test_each_valid_register_and_stage_combination_compiles_in_full(v):
    c = compile_source(set_tunables(SRC, v), "sm_90a", 128)
    assert c.ok, c.log[-2000:]
    # the rules assume this launch count; setmaxnreg makes ptxas use the whole __launch_bounds__ cap
    assert c.registers == LAUNCH_REGS, f"ptxas gave {c.registers} registers per thread, the rules assume 168"
    assert c.spill_bytes == 0, f"{c.spill_bytes} bytes spilled"
