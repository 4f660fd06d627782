import json
import subprocess
import sys

import pytest

from avo.config import ConfigError, validate
from avo.problem import problem_from_cfg
from tests.conftest import CONF, ROOT, make_cfg

GROUPS = ["search", "agent", "kernel", "harness", "launcher"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "kernel" and option == "gqa":
        overrides.append("group=4")
    cfg = make_cfg(*overrides)
    validate(cfg)
    assert cfg[group].name


def test_gqa_group_sets_kv_heads():
    for g, kv in [(4, 8), (8, 4)]:
        cfg = make_cfg("kernel=gqa", f"group={g}")
        validate(cfg)
        p = problem_from_cfg(cfg.kernel)
        assert (p.heads_q, p.heads_kv, p.group) == (32, kv, g)


def test_default_benchmark_set_is_the_papers():
    cfg = make_cfg()
    validate(cfg)
    p = problem_from_cfg(cfg.kernel)
    assert {(s.batch, s.seqlen_q) for s in p.bench} == {(8, 4096), (4, 8192), (2, 16384), (1, 32768)}
    assert {s.causal for s in p.bench} == {True, False}
    assert all(s.head_dim == 128 and s.heads_q == 16 for s in p.bench)
    assert any(s.seqlen_q % 64 for s in p.check), "check set must include odd lengths"


@pytest.mark.parametrize("overrides,needle", [
    (["kernel=gqa", "group=5"], "group=5 does not divide the 32 query heads"),
    (["kernel=mha", "group=4"], "use kernel=gqa"),
    (["search.max_steps=-1"], "search.max_steps=-1"),
    (["search.max_hours=0"], "search.max_hours"),
    (["search.stagnation.no_commit_steps=-2"], "no_commit_steps"),
    (["kernel.head_dim=96"], "head_dim=96"),
    (["harness.keep_jobs=sometimes"], "harness.keep_jobs='sometimes': use one of all, failed, none"),
])
def test_invalid_values_fail_with_one_line(overrides, needle):
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def _launch(*args):
    return subprocess.run([sys.executable, "-m", "avo.launch", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_errors_are_one_clear_message(tmp_path):
    r = _launch("kernel=gqa", "group=3", "harness=compile", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip() == "avo: error: group=3 does not divide the 32 query heads (choose a divisor of 32)"
    r = _launch("agent=nosuchagent", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0 and "Could not find 'agent/nosuchagent'" in r.stderr
    assert "Traceback" not in r.stderr
    listed = r.stderr.split("Available options in 'agent':")[1].split("Config search path")[0].split()
    assert listed == options("agent")  # the real agents, never the schemas they extend
    r = _launch("search.max_stepz=3", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0 and "max_stepz" in r.stderr and "Traceback" not in r.stderr


def test_multirun_runs_one_job_per_group(tmp_path):
    r = subprocess.run([sys.executable, "-m", "avo.launch", "-m", "kernel=gqa", "group=4,8", "harness=compile",
                        "seed=naive", "search.max_steps=0", f"hydra.sweep.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = {json.loads(p.read_text())["heads_kv"]: p.parent.name for p in tmp_path.glob("*/run.json")}
    assert runs == {8: "group=4,harness=compile,kernel=gqa,seed=naive",
                    4: "group=8,harness=compile,kernel=gqa,seed=naive"}


def test_a_path_valued_override_makes_one_sweep_folder_not_a_tree(tmp_path):
    seed = ROOT / "kernels_cuda" / "naive" / "naive.cu"
    r = subprocess.run([sys.executable, "-m", "avo.launch", "-m", "group=1,2", "kernel=gqa", "harness=compile",
                        f"seed={seed}", "search.max_steps=0", f"hydra.sweep.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    flat = str(seed).replace("/", "_")
    assert sorted(p.parent.name for p in tmp_path.glob("*/run.json")) == [
        f"group={g},harness=compile,kernel=gqa,seed={flat}" for g in (1, 2)]


def test_long_sweep_folder_names_stay_within_file_name_limits():
    from avo.config import flat_dirname

    names = {flat_dirname(f"seed=/{'x' * 300}/{i}") for i in range(2)}
    assert len(names) == 2 and all(len(n) == 200 and "/" not in n for n in names)
    assert flat_dirname("group=4,seed=sm90") == "group=4,seed=sm90"


def test_default_gpu_harness_without_a_gpu_names_the_cpu_alternative(tmp_path):
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU driver is present here")
    r = _launch("search=smoke", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "avo: error:" in r.stderr and "use harness=compile" in r.stderr


def test_spares_follow_the_search_workers_per_gpu(cfg_factory):
    """One spare per worker a GPU serves, plus one, never fewer than two; an explicit value wins."""
    from avo.config import spares_for

    assert [spares_for(k, None) for k in (1, 2, 4, 8)] == [2, 3, 5, 9]
    assert spares_for(8, [0, 1]) == 5 and spares_for(3, [0, 1]) == 3
    assert cfg_factory("harness=gpu", "search.workers=4").harness.spares == 5
    assert cfg_factory("harness=gpu", "search.workers=4", "harness.spares=1").harness.spares == 1
