"""Time limits per stage and a broken environment, with the real worker process and real NVRTC."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avo.config import HarnessConf
from avo.harness import CompileHarness, HarnessUnavailable
from avo.types import Problem, Shape, Status

ROOT = Path(__file__).resolve().parents[1]
NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()
PROBLEM = Problem("t", 4, 4, 128, (Shape(1, 64, 64, 4, 4, 128, False),), (Shape(1, 17, 17, 4, 4, 128, True),))
# 40^3 template instantiations: about 15 s of NVRTC front end on one core
BOMB = NAIVE + """
template <int A, int B, int C> struct P {
  static constexpr int v = (P<A - 1, B, C>::v + P<A, B - 1, C>::v + P<A, B, C - 1>::v) % 1000003; };
template <int B, int C> struct P<0, B, C> { static constexpr int v = 1; };
template <int A, int C> struct P<A, 0, C> { static constexpr int v = 1; };
template <int A, int B> struct P<A, B, 0> { static constexpr int v = 1; };
template <int C> struct P<0, 0, C> { static constexpr int v = 1; };
template <int B> struct P<0, B, 0> { static constexpr int v = 1; };
template <int A> struct P<A, 0, 0> { static constexpr int v = 1; };
template <> struct P<0, 0, 0> { static constexpr int v = 1; };
static_assert(P<40, 40, 40>::v != -1, "never");
"""


def _harness(tmp_path, **kw) -> CompileHarness:
    pytest.importorskip("cuda.core")
    cfg = OmegaConf.structured(HarnessConf(name="compile", cache_dir="", **kw))
    return CompileHarness(cfg, tmp_path / "jobs")


def test_compilation_has_its_own_time_limit(tmp_path):
    h = _harness(tmp_path, compile_timeout_s=3.0, timeout_s=600.0)
    t0 = time.monotonic()
    r = h.evaluate(BOMB, PROBLEM)
    took = time.monotonic() - t0
    assert r.status == Status.TIMEOUT and "compile stage ran past its 3 s limit" in r.error, r.error
    assert took < 12, f"killed after {took:.1f} s"
    kept = list((tmp_path / "jobs").iterdir())  # harness.keep_jobs=failed: a timeout's folder stays, for its log
    assert len(kept) == 1 and (kept[0] / "worker.log").exists() and (kept[0] / "source.cu").read_text() == BOMB
    assert h.evaluate(NAIVE, PROBLEM).status == Status.OK
    assert list((tmp_path / "jobs").iterdir()) == kept  # an ok evaluation's folder is gone


@pytest.mark.parametrize("keep,left", [("failed", 0), ("all", 2), ("none", 0)])
def test_job_folders_are_kept_as_configured_and_candidates_are_not_cached(tmp_path, keep, left):
    """A week of attempts would leave gigabytes of job folders and cached cubins; the lineage keeps
    what a row needs (source, error, log tail), and the cache holds only what is compiled again."""
    h = _harness(tmp_path, keep_jobs=keep)
    h.cfg.cache_dir = str(tmp_path / "cubin")
    ok, broken = h.evaluate(NAIVE, PROBLEM), h.evaluate(NAIVE.replace("{", "{ syntax error", 1), PROBLEM)
    assert (ok.status, broken.status) == (Status.OK, Status.COMPILE_ERROR)  # the lineage has its error and log
    assert len(list((tmp_path / "jobs").iterdir())) == left
    assert not (tmp_path / "cubin").exists() or not any((tmp_path / "cubin").iterdir())


@pytest.mark.parametrize("phase, status", [("compile", Status.COMPILE_ERROR), ("verify", Status.ERROR)])
def test_a_worker_group_over_its_host_memory_is_killed_with_one_line(tmp_path, phase, status):
    """A compile bomb must not wake the host's out-of-memory killer: the parent reads the worker group's
    memory from /proc (a grandchild's counts) and kills the group (CUDA needs a large virtual address
    space, so RLIMIT_AS is no bound). While compiling it is the candidate's fault; later, the harness's."""
    import os
    import sys

    from avo.harness.sandbox import run_worker

    child = ("import pathlib, subprocess, sys\n"
             f"pathlib.Path(sys.argv[-1], 'phase').write_text({phase!r})\n"
             "p = subprocess.Popen([sys.executable, '-c', 'import time; x = bytearray(600 << 20); time.sleep(120)'])\n"
             "pathlib.Path(sys.argv[-1], 'grandchild').write_text(str(p.pid))\n"
             "p.wait()\n")
    t0 = time.monotonic()
    r = run_worker(tmp_path, 120, prefix=[sys.executable, "-c", child], max_host_gb=0.25)
    assert r.status == status and "host memory reached" in r.error and "harness.max_host_gb=0.25" in r.error, r.error
    assert ("compile bomb" in r.error) == (phase == "compile") and time.monotonic() - t0 < 30
    pid = int((tmp_path / "grandchild").read_text())
    for _ in range(100):  # killed with its group; reaped by whoever adopted it
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        raise AssertionError("the grandchild outlived its killed group")


def test_a_deadline_stops_an_evaluation_in_flight(tmp_path):
    h = _harness(tmp_path, compile_timeout_s=60.0)
    t0 = time.monotonic()
    r = h.evaluate(BOMB, PROBLEM, deadline=time.monotonic() + 2.0)
    assert r.status == Status.TIMEOUT and "deadline" in r.error and time.monotonic() - t0 < 10


def test_a_broken_environment_stops_with_one_line_not_a_bad_candidate(tmp_path, monkeypatch):
    """NVRTC that cannot be loaded is the machine's fault: HarnessUnavailable, not compile_error."""
    fake = tmp_path / "broken"
    (fake / "cuda").mkdir(parents=True)
    (fake / "cuda" / "__init__.py").write_text("raise ImportError('libnvrtc.so.13: cannot open shared object file')\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake}:{ROOT}")
    h = _harness(tmp_path)
    with pytest.raises(HarnessUnavailable, match="NVRTC cannot be loaded.*libnvrtc"):
        h.evaluate(NAIVE, PROBLEM)


def test_search_stops_on_a_broken_environment_and_records_nothing(cfg_factory, tmp_path, monkeypatch):
    from avo import lineage
    from avo.search import run_search

    fake = tmp_path / "broken"
    (fake / "cuda").mkdir(parents=True)
    (fake / "cuda" / "__init__.py").write_text("raise ImportError('libnvrtc.so.13: cannot open shared object file')\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake}:{ROOT}")
    run = tmp_path / "run"
    cfg = cfg_factory("harness=compile", "agent=mutation", "seed=naive", "search=smoke", run_dir=run)
    with pytest.raises(HarnessUnavailable, match="NVRTC"):
        run_search(cfg)
    assert lineage.read_run(run).is_empty()


def test_operators_get_a_bench_bound_to_the_step_with_results_cached_by_source(tmp_path):
    from avo.harness import HarnessBench
    from avo.harness.profile import ProfileError

    h = _harness(tmp_path)
    calls = []
    evaluate = h.evaluate
    h.evaluate = lambda *a, **kw: calls.append(kw.get("mode")) or evaluate(*a, **kw)
    bench = HarnessBench(h, PROBLEM)
    assert (bench.name, bench.ranks, bench.checks, bench.profiles) == ("compile", False, False, False)
    first = bench.compile(NAIVE)
    assert first.status == Status.OK and bench.compile(NAIVE) is first and calls == ["compile"]
    bench.check(NAIVE)
    assert calls == ["compile", "check"]  # another purpose, another evaluation
    with pytest.raises(ProfileError, match="harness=compile: it runs no kernel"):
        bench.profile(NAIVE)


def test_the_job_contract_round_trips_and_refuses_fields_it_does_not_know(tmp_path):
    import json

    from avo.harness.job import Job

    h = _harness(tmp_path)
    job_dir = h.write_job(NAIVE, PROBLEM, sources={"a": "/x/a.cu"})
    job = Job.read(job_dir)
    assert (job.mode, job.arch, job.problem_of(), job.sources) == ("compile", "sm_90a", PROBLEM, {"a": "/x/a.cu"})
    assert job.job_dir == str(job_dir) and (job_dir / "source.cu").read_text() == NAIVE
    from avo.types import Reference

    paired = Job.read(h.write_job(NAIVE, PROBLEM, "evaluate", others=[Reference("incumbent", 3, "// v3\n")]))
    assert Path(paired.others["incumbent"]).read_text() == "// v3\n"  # beside the candidate, named by role
    d = json.loads((job_dir / "job.json").read_text())
    (job_dir / "job.json").write_text(json.dumps({**d, "sneaky": 1}))
    with pytest.raises(ValueError, match="unknown fields \\['sneaky'\\]"):
        Job.read(job_dir)


def test_the_screen_of_a_seed_paired_evaluation_is_held_to_the_benchmarks_limit():
    """The seed is timed with nothing to screen against, so it has no screen time: the screen of the first
    candidates gets the benchmark's limit (a shorter run of the same kernels), not harness.timeout_s."""
    from avo.harness.gpu import GpuHarness
    from avo.types import Reference

    h = object.__new__(GpuHarness)  # limits() needs only the config: no GPU, no probe
    h.cfg = OmegaConf.structured(HarnessConf(name="gpu", stage_mult=4.0, stage_floor_s=10.0, compile_timeout_s=60.0))
    seed = Reference("incumbent", 0, "", {"verify": 0.7, "bench": 3.4})
    assert h.limits([seed]) == {"compile": 60.0, "verify": 10.0, "bench": 13.6, "screen": 13.6}
    timed = Reference("incumbent", 3, "", {"verify": 0.7, "screen": 0.3, "bench": 3.4})
    assert h.limits([timed])["screen"] == 10.0  # its own screen time, at least the floor
    assert h.limits(None) == {"compile": 60.0}


def test_a_worker_outlives_the_thread_that_started_it_and_dies_with_the_process(tmp_path):
    """A spare is forked by whichever search worker's thread refilled the pool and may run another
    thread's job: it must not die when its forking thread ends (PR_SET_PDEATHSIG follows the thread:
    seen on the H200 as 'worker died (signal 9)' at the end of a four-worker search), only with the process."""
    import subprocess
    import sys
    import textwrap
    import threading

    from avo.harness.sandbox import _kill_group, spawn

    procs = []

    def start():  # a standby worker waits for its job on stdin (here it finds no GPU and waits anyway)
        with open(tmp_path / "spare.log", "wb") as log:
            procs.append(spawn(["--standby", "0", str(tmp_path / "gpu.lock")], log, stdin=subprocess.PIPE))

    t = threading.Thread(target=start)
    t.start()
    t.join()
    time.sleep(1.5)
    assert procs[0].poll() is None, (tmp_path / "spare.log").read_text()
    _kill_group(procs[0])

    # and a parent process that dies takes its workers with it
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        from avo.harness.sandbox import spawn
        p = spawn(["--standby", "0", {str(tmp_path / "gpu.lock")!r}], open({str(tmp_path / "p.log")!r}, "wb"),
                  stdin=subprocess.PIPE)
        print(p.pid, flush=True)
        time.sleep(60)
    """)
    outer = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(outer.stdout.readline())
    outer.kill()
    outer.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker {pid} outlived its parent process")
