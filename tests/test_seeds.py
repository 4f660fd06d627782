"""Every seed compiles with NVRTC for Hopper, states its geometry, and rejects bad tunables at compile time."""

import pytest
import yaml

from avo.contract import set_tunables, tunables
from avo.harness.nvrtc import compile_source
from avo.harness.static import check_source
from avo.seeds import KERNELS_DIR, available

SEEDS = available()


def test_the_three_seeds_exist():
    assert {"naive", "sm80", "sm90"} <= set(SEEDS)


@pytest.mark.parametrize("name", SEEDS)
def test_seed_compiles_for_every_head_dim_it_claims(name):
    spec = yaml.safe_load((KERNELS_DIR / name / f"{name}.yaml").read_text())
    src = (KERNELS_DIR / name / f"{name}.cu").read_text()
    assert spec["head_dims"], "a seed lists the head dims it supports"
    for d in spec["head_dims"]:
        c = compile_source(src, "sm_90a", d)
        assert c.ok, c.log[-2000:]
        assert c.launch.threads % 32 == 0 and c.launch.smem <= 227 * 1024
        assert c.spill_bytes is not None and c.spill_bytes <= 512, f"d={d}: {c.spill_bytes} bytes spilled"


@pytest.mark.parametrize("name", SEEDS)
def test_seed_passes_the_static_gate_and_declares_tunables(name):
    src = (KERNELS_DIR / name / f"{name}.cu").read_text()
    assert check_source(src) is None
    assert tunables(src), f"{name} declares no `// @tunable` knobs for the operators"


def test_sm80_rejects_a_register_overflow_combination_at_compile_time():
    src = (KERNELS_DIR / "sm80" / "sm80.cu").read_text()
    c = compile_source(set_tunables(src, {"Q_IN_REGS": "1"}), "sm_90a", 128)
    assert not c.ok and "static assertion" in c.log


def test_unsupported_head_dim_is_a_compile_error_not_a_wrong_answer():
    for name in SEEDS:
        spec = yaml.safe_load((KERNELS_DIR / name / f"{name}.yaml").read_text())
        if 64 not in spec["head_dims"]:
            c = compile_source((KERNELS_DIR / name / f"{name}.cu").read_text(), "sm_90a", 64)
            assert not c.ok


def test_sm90_rejects_a_register_split_over_the_cta_pool():
    # fits in the 64K register file, but setmaxnreg.inc would wait forever (tests/test_sm90_space.py)
    src = (KERNELS_DIR / "sm90" / "sm90.cu").read_text()
    c = compile_source(set_tunables(src, {"PRODUCER_REGS": "32", "CONSUMER_REGS": "240"}), "sm_90a", 128)
    assert not c.ok and "sm90 rule [register pool]" in c.log


def test_a_seed_that_cannot_run_the_problem_stops_the_launch_with_one_line(cfg_factory):
    from avo.config import validate
    from avo.errors import SeedError

    with pytest.raises(SeedError, match=r"seed=sm90 supports head dims \[128\], not 64; "
                                        r"seeds that do: naive, sm80, sm90_d64, sm90_hdim"):
        validate(cfg_factory("seed=sm90", "kernel.head_dim=64", "harness=compile"))
    with pytest.raises(SeedError, match="needs sm_90a or newer, this target is sm_80"):
        validate(cfg_factory("seed=sm90", "harness=compile", "harness.arch=sm_80"))
    validate(cfg_factory("seed=naive", "kernel.head_dim=64", "harness=compile"))


def test_one_resolver_serves_search_bench_and_export():
    from avo import bench
    from avo.export import _resolve
    from avo.seeds import resolve

    for spec in ("naive", str(KERNELS_DIR / "sm80" / "sm80.cu")):
        timed = bench.seeds(bench.compose([f"seeds=[{spec}]", "harness=compile"]))
        assert [s.source for s in timed.values()] == [resolve(spec).source] == [_resolve(spec).source]
    assert resolve("sm90").meta["min_arch"] == "sm_90a" and resolve("sm90").name == "sm90"
