from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from avo.config import register

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA = Path(__file__).parent / "data"


def make_cfg(*overrides: str, run_dir: Path | None = None) -> DictConfig:
    """The config `python -m avo.launch <overrides>` would compose."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir) if run_dir else "unused"
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides, run_dir=None):
        return make_cfg(*overrides, run_dir=run_dir or tmp_path / "run")
    return factory


def open_gpu_harness(tmp_path_factory, timeout_s: float):
    """A real GpuHarness on device 0, or a skip that says why (no GPU here)."""
    from omegaconf import OmegaConf

    from avo.config import HarnessConf
    from avo.harness import HarnessUnavailable
    from avo.harness.gpu import GpuHarness

    cfg = OmegaConf.structured(HarnessConf(name="gpu", arch="auto", timeout_s=timeout_s,
                                           cache_dir=str(tmp_path_factory.mktemp("cubin"))))
    try:
        return GpuHarness(cfg, tmp_path_factory.mktemp("jobs"))
    except HarnessUnavailable as e:
        pytest.skip(str(e))


ADVERSARIAL_DIR = Path(__file__).parent / "gpu" / "adversarial"


def adversarial_sources() -> dict[str, str]:
    """Each cheating candidate: the naive seed with the SEARCH/REPLACE edits of its .edit file."""
    from avo.agent.edits import apply_edits, parse_blocks

    naive = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()
    return {p.stem: apply_edits(naive, parse_blocks(p.read_text())) for p in sorted(ADVERSARIAL_DIR.glob("*.edit"))}


def kill_mid_run(cmd: list[str], run_dir: Path, parts: int, timeout_s: float) -> None:
    """Start `python -m avo.launch ...`, SIGKILL its process group once `parts` attempts reached disk."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while len(list((run_dir / "lineage").glob("part-*.parquet"))) < parts and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_and_resume(args: list[str], tmp_path: Path):
    """Kill a run of `python -m avo.launch ARGS` once 9 attempts are on disk, resume it two steps past
    its last, and check that nothing recorded changed or went missing and no candidate id repeats.
    Returns (rows before, rows after, last step before, the resumed run's stdout)."""
    import subprocess

    from avo import lineage

    run_dir = tmp_path / "run"
    kill_mid_run([*args, "search.max_steps=60", f"hydra.run.dir={run_dir}"], run_dir, parts=9, timeout_s=180)
    before = lineage.read_run(run_dir)
    assert 9 <= len(before) < 1 + 60 * 3
    last = int(before["step"].max())
    r = subprocess.run([*args, f"search.max_steps={last + 2}", f"resume={run_dir}",
                        f"hydra.run.dir={tmp_path / 'ignored'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = lineage.read_run(run_dir)
    assert after["candidate_id"].is_unique().all() and len(after) > len(before)
    kept = after.join(before.select("candidate_id"), on="candidate_id", how="semi").sort("step", "attempt")
    assert kept.equals(before.sort("step", "attempt")), "a recorded attempt changed or went missing"
    assert (after["step"] == 0).sum() == 1, "the seed is evaluated once"
    return before, after, last, r.stdout


def benchmark_module(name: str):
    """benchmarks/<name>.py imported by path (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RULES_END = "// ---- end of the validity rules"


def rules_block(src: str) -> str:
    """A kernel's validity rules: the part of its source above the end marker, which compiles on its own."""
    return src[:src.index(RULES_END)]


def assert_rules_cover(src: str, rule_keys: tuple[str, ...]) -> None:
    """A kernel's validity rules sit above its end marker and read no tunable beyond `rule_keys`, so that every
    combination of those covers every declared one (tests/test_sm90_space.py)."""
    import re

    from avo.contract import tunables

    declared = tunables(src)
    assert set(rule_keys) <= set(declared)
    assert "sm90 rule [" not in src[src.index(RULES_END):], "keep every validity rule above the end marker"
    code = "\n".join(ln.split("//", 1)[0] for ln in rules_block(src).splitlines()
                     if "@tunable" not in ln and not ln.startswith("AVO_LAUNCH("))
    others = [n for n in declared if n not in rule_keys and re.search(rf"\b{n}\b", code)]
    assert not others, f"the rules read {others}: add them to the rule keys"


def rule_combinations(declared: dict, names: tuple[str, ...]) -> list[dict[str, str]]:
    """Every combination of the declared values (avo.contract.tunables) of `names`."""
    import itertools

    choices = itertools.product(*(declared[n].choices for n in names))
    return [dict(zip(names, values, strict=True)) for values in choices]


def broken_rules(log: str) -> set[str]:
    """The validity rules a compile's static_asserts name ("sm90 rule [name]")."""
    import re

    return set(re.findall(r'static assertion failed with "sm90 rule \[([^\]]+)\]', log))
