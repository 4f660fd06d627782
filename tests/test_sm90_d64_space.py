"""sm90_d64's declared tunable space: no combination may compile and then hang on the GPU.

As for sm90 (tests/test_sm90_space.py): every combination of what the rules read either meets them or fails
to compile with the static_assert that names the broken rule, restated here from the PTX ISA (setmaxnreg)
and Hopper's limits. Three consumer warpgroups make the CTA 512 threads, so the launch count is 128 registers
and the pool 4 x 128.
"""
import pytest

from avo.contract import set_tunables, tunables
from avo.harness.nvrtc import compile_source
from avo.seeds import KERNELS_DIR
from tests.conftest import assert_rules_cover, broken_rules, rule_combinations, rules_block

SRC = (KERNELS_DIR / "sm90_d64" / "sm90_d64.cu").read_text()
RULES = rules_block(SRC)
TUNABLES = tunables(SRC)
RULE_KEYS = ("STAGES", "PRODUCER_REGS", "CONSUMER_REGS", "CONSUMERS_D64", "BLOCK_N_FULL", "BLOCK_N_CAUSAL",
             "RESCALE_LOG2", "EXP2_POLY_D64")


def expected_violations(v: dict[str, str]) -> set[str]:
    stages, prod, cons, n, bn_full, bn_causal, rescale, poly = (int(v[k]) for k in RULE_KEYS)
    launch = 65536 // (128 * (n + 1)) // 8 * 8  # ptxas's cap for __launch_bounds__(threads, 1)
    eff = 160 if n == 3 else cons               # three consumers take 160 each
    broken = set()
    if n == 3 and max(bn_full, bn_causal) != 128:
        broken.add("consumers")   # O, S and P of a wider block do not fit in 160 registers
    if prod % 8 or not 24 <= prod <= launch:
        broken.add("producer regs")
    if eff % 8 or not launch <= eff <= 256:
        broken.add("consumer regs")
    if prod + n * eff > (n + 1) * launch:
        broken.add("register pool")  # setmaxnreg.inc would wait forever
    if not {bn_full, bn_causal} <= {128, 176}:
        broken.add("block width")
    if not 0 <= poly <= 16:
        broken.add("exp2 poly")
    if not 0 <= rescale <= 16:
        broken.add("rescale")
    smem = 64 * n * 64 * 2 + stages * 2 * max(bn_full, bn_causal) * 64 * 2 + 256 + 1024  # Q + K/V ring at d64
    if stages < 2 or smem > 227 * 1024:
        broken.add("shared memory")
    if 8 * (2 + 4 * stages) > 128:
        broken.add("mbarriers")
    return broken


def test_the_declared_space_is_what_the_rules_cover():
    assert_rules_cover(SRC, RULE_KEYS)


def test_every_declared_combination_meets_the_rules_or_names_the_one_it_breaks():
    pytest.importorskip("cuda.bindings")
    every = rule_combinations(TUNABLES, RULE_KEYS)
    rejected = 0
    for v in every:
        c = compile_source(set_tunables(RULES, v), "sm_90a", 64)
        want = expected_violations(v)
        assert broken_rules(c.log) == want, f"{v}: expected {sorted(want) or 'valid'}\n{c.log[-1500:]}"
        assert c.ok == (not want), f"{v}: {c.error}\n{c.log[-1500:]}"
        rejected += bool(want)
    assert 0 < rejected < len(every)
    assert not expected_violations({k: t.value for k, t in TUNABLES.items()}), "the defaults are valid"


@pytest.mark.parametrize("consumers,producer", [("2", "24"), ("2", "40"), ("3", "24"), ("3", "32")])
def test_each_consumer_count_compiles_in_full_at_the_launch_count_the_rules_assume(consumers, producer):
    pytest.importorskip("cuda.bindings")
    v = {"CONSUMERS_D64": consumers, "PRODUCER_REGS": producer, "CONSUMER_REGS": "232"}
    assert not expected_violations({**{k: t.value for k, t in TUNABLES.items()}, **v})
    c = compile_source(set_tunables(SRC, v), "sm_90a", 64)
    assert c.ok, c.log[-2000:]
    assert c.registers == 65536 // (128 * (int(consumers) + 1)) // 8 * 8, c.registers
    assert c.spill_bytes == 0, f"{c.spill_bytes} bytes spilled"
