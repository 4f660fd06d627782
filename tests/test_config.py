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


SCHEMAS = {("search", "search"): "SearchConf", ("agent", "mutation"): "MutationAgentConf",
           ("agent", "llm"): "LlmAgentConf", ("agent", "external"): "ExternalAgentConf",
           ("kernel", "kernel"): "KernelConf", ("harness", "harness"): "HarnessConf",
           ("launcher", "launcher"): "LauncherConf", ("launcher", "slurm"): "SlurmLauncherConf"}


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_each_yaml_option_carries_deltas_only(group, option):
    """A value equal to its schema's default says nothing, and drifts from it (max_steps was 500 here, 100 there)."""
    import yaml
    from omegaconf import OmegaConf

    from avo import config

    spec = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
    schema = next(d for d in spec["defaults"] if isinstance(d, dict))[f"/schema/{group}@_here_"]
    default = OmegaConf.to_container(OmegaConf.structured(getattr(config, SCHEMAS[group, schema])))
    restated = [k for k, v in _leaves({k: v for k, v in spec.items() if k != "defaults"})
                if OmegaConf.select(OmegaConf.create(default), k, default="<none>") == v]
    assert not restated, f"conf/{group}/{option}.yaml restates its schema's defaults: {restated}"
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    assert not {k for k in top if k not in ("defaults", "hydra")}, "conf/config.yaml restates avo.config.Config"


def test_code_reads_config_fields_without_restating_their_defaults():
    """cfg.get("spares", 1) read 1 where the schema says 2: a schema field is read as an attribute."""
    import ast
    from dataclasses import fields

    from avo import config

    names = {f.name for c in vars(config).values() if isinstance(c, type) and hasattr(c, "__dataclass_fields__")
             for f in fields(c)}
    found = []
    for path in sorted((ROOT / "avo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value in names
                    and "cfg" in ast.unparse(node.func.value).lower()):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_default_search_is_a_week_and_max_steps_is_the_schemas():
    cfg = make_cfg()
    assert (cfg.search.max_steps, cfg.search.max_hours, cfg.search.attempts_per_step) == (500, 168.0, 3)


@pytest.mark.parametrize("overrides,needle", [
    (["agent=smollm", "agent.budget.max_turns=0"], "agent.budget.max_turns=0 must be positive"),
    (["agent=external", "agent.budget.idle_seconds=0"], "agent.budget.idle_seconds=0.0 must be positive"),
    (["agent=external", "agent.tools=[edit,shell]"], "agent.tools: unknown ['shell']"),
    (["agent=qwen", "agent.sampling.tool_choice=always"], "agent.sampling.tool_choice='always'"),
    (["agent.max_changes=0"], "agent.max_changes and agent.max_tries must be >= 1"),
    (["launcher.job=server"], "launcher.job=server starts vLLM for an LLM agent's model: agent=mutation"),
    (["agent=openai", "launcher.job=server"], "with agent.server.mode=external"),
])
def test_agent_and_launcher_settings_stop_the_launch_before_anything_is_written(tmp_path, overrides, needle):
    """Checked by validate, so neither run.json nor a Slurm job exists when the setting is wrong (the external
    agent's budget was checked only when its operator was built, after run.json; on Slurm, in the job)."""
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("harness=compile", *overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)
    r = _launch("harness=compile", *overrides, "launcher=slurm", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "slurm").exists()
