"""harness.devices without a GPU: the setting's checks, the GPUs a Slurm job asks for, which GPU takes
each evaluation, and the GPU harness's lock, spares and probe per GPU (the probe and the worker's
result are stand-ins here; tests/gpu/test_devices_gpu.py runs the real ones)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from avo.config import HarnessConf, validate
from avo.errors import ConfigError, HarnessUnavailable
from avo.harness import gpu
from avo.harness.devices import Device, DevicePool, gpus_needed, harness_devices
from avo.harness.job import Job
from avo.types import EvalResult, Problem, Shape, Status
from tests.conftest import ROOT

NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()
PROBLEM = Problem("t", 4, 4, 128, (Shape(1, 64, 64, 4, 4, 128, False),), (Shape(1, 17, 17, 4, 4, 128, True),))


# -- the setting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, devices", [((), [0]), (("harness.device=3",), [3]),
                                                (("harness.devices=[2,0,1]",), [2, 0, 1])])
def test_the_harness_gpus_are_harness_devices_or_else_harness_device(cfg_factory, overrides, devices):
    cfg = cfg_factory(*overrides)
    validate(cfg)
    assert harness_devices(cfg.harness) == devices


@pytest.mark.parametrize("overrides, message", [
    (("harness.devices=[]",), "harness.devices=[] names no GPU: list device indices, or leave it unset"),
    (("harness.devices=[0,1,0]",), "harness.devices=[0,1,0] names GPU 0 twice: list each GPU once"),
    (("harness.devices=[0,-1]",), "harness.devices=[0,-1]: device indices are >= 0"),
    (("harness.device=-2",), "harness.device=-2: device indices are >= 0"),
    (("agent=qwen", "harness.devices=[0,1]"),  # qwen's managed server runs on GPUs 1 and 2
     "harness.devices=[0,1] and agent.server.gpus=[1,2] share GPU 1: the model server keeps its own GPUs"),
    (("agent=qwen", "harness.device=2"), "harness.device=2 and agent.server.gpus=[1,2] share GPU 2"),
])
def test_a_list_that_cannot_be_is_one_line_naming_the_setting(cfg_factory, monkeypatch, overrides, message):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError) as e:
        validate(cfg_factory(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_server_keeps_its_gpus_only_against_a_harness_that_times(cfg_factory):
    validate(cfg_factory("agent=qwen", "harness=compile", "harness.devices=[1]"))  # compiles only: no clash
    validate(cfg_factory("agent=qwen", "harness.devices=[0,3]", "agent.server.mode=external"))  # not on this node


def test_the_launch_stops_with_the_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "avo.launch", "harness.devices=[1,1]", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("avo: error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert errors == ["avo: error: harness.devices=[1,1] names GPU 1 twice: list each GPU once (each has one "
                      "timing lock)"]


@pytest.mark.parametrize("overrides, need, why", [
    (("harness=compile",), 0, ""),
    ((), 1, "harness.device=0"),
    (("harness.devices=[0,1]",), 2, "harness.devices=[0,1]"),
    (("harness.devices=[3]",), 4, "harness.devices=[3]"),  # an index into the job's GPUs: it needs four
    (("agent=qwen",), 3, "harness.device=0 and agent.server.gpus=[1,2]"),
    (("agent=qwen", "harness.devices=[3,4]"), 5, "harness.devices=[3,4] and agent.server.gpus=[1,2]"),
    (("agent=qwen", "harness=compile"), 3, "agent.server.gpus=[1,2]"),
    (("agent=smollm",), 1, "harness.device=0"),  # a server without GPUs named: launcher.gpus_per_node says
])
def test_a_search_job_asks_for_the_gpus_its_settings_use(cfg_factory, overrides, need, why):
    assert gpus_needed(cfg_factory(*overrides)) == (need, why)


# -- which GPU takes an evaluation ------------------------------------------------------------------
def _pool(n: int) -> DevicePool:
    return DevicePool([Device(i, "G", f"/locks/gpu-{i}.lock") for i in range(n)])


def test_an_evaluation_goes_to_the_least_busy_gpu_and_ties_to_the_one_idle_longest():
    pool = _pool(3)
    order = []
    for _ in range(6):  # one at a time: round robin
        with pool.use() as d:
            order.append(d.index)
    assert order == [0, 1, 2, 0, 1, 2]
    with pool.use() as a, pool.use() as b:  # 0 and 1 busy: 2 is next, then the one that waited longest
        with pool.use() as c, pool.use() as d:
            assert (a.index, b.index, c.index, d.index) == (0, 1, 2, 0)
            assert [x.busy for x in pool.all] == [2, 1, 1]
    assert [x.busy for x in pool.all] == [0, 0, 0]


def test_a_gpu_taken_out_takes_no_more_work_and_none_left_is_unavailable():
    pool = _pool(2)
    assert [d.index for d in pool.take_out(pool.all[0])] == [1]
    assert {pool.first().index} | {_used(pool) for _ in range(3)} == {1}
    pool.take_out(pool.all[1])
    with pytest.raises(HarnessUnavailable, match="no GPU of the harness answers any more"):
        with pool.use():
            pass
    with pytest.raises(HarnessUnavailable):
        pool.first()


def _used(pool) -> int:
    with pool.use() as d:
        return d.index


def test_concurrent_evaluations_spread_evenly_and_the_counts_stay_exact():
    pool, per_device, lock = _pool(3), {0: 0, 1: 0, 2: 0}, threading.Lock()
    peak = {0: 0, 1: 0, 2: 0}

    def work():
        for _ in range(20):
            with pool.use() as d:
                with lock:
                    per_device[d.index] += 1
                    peak[d.index] = max(peak[d.index], d.busy)
                time.sleep(0.002)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(per_device.values()) == 120 and min(per_device.values()) >= 30, per_device
    assert max(peak.values()) <= 3, peak  # six at once over three GPUs: never three on one while one idles
    assert [d.busy for d in pool.all] == [0, 0, 0]


# -- the GPU harness over several GPUs -----------------------------------------------------------------
def uuid_of(device: int) -> str:
    """The driver UUID the probe reports for GPU `device` (32 hex digits)."""
    return f"{0x5EED0000 + device:032x}"


@pytest.fixture
def probes(monkeypatch):
    """probe_gpu answers for GPUs 0-3 (an H200 each, its own UUID) except the `broken` ones; `calls` in order."""
    state = SimpleNamespace(broken=set(), calls=[])

    def probe(device: int = 0) -> dict:
        state.calls.append(device)
        if device in state.broken or device > 3:
            raise gpu.ProbeFailed(f"no usable CUDA GPU {device} here (CUDA driver error 999); use harness=compile",
                                  "CUDA driver error 999")
        return {"cc": [9, 0], "name": "NVIDIA H200", "uuid": uuid_of(device)}

    monkeypatch.setattr(gpu, "probe_gpu", probe)
    return state


def _harness(tmp_path, devices, spares=0, **kw) -> gpu.GpuHarness:
    kw.setdefault("cache_dir", str(tmp_path / "cache" / "cubin"))
    cfg = OmegaConf.structured(HarnessConf(name="gpu", arch="auto", devices=devices, spares=spares, **kw))
    return gpu.GpuHarness(cfg, tmp_path / "jobs")


@pytest.fixture
def worker(monkeypatch):
    """The worker's result: `says[device]` (default ok); `jobs`: the job each evaluation handed it."""
    state = SimpleNamespace(says={}, jobs=[])

    def run_worker(job_dir, timeout_s, env=None, prefix=None, limits=None, deadline=None, max_host_gb=None):
        job = Job.read(job_dir)
        state.jobs.append(job)
        status = state.says.get(job.device, Status.OK)
        return EvalResult(status, error="" if status == Status.OK else f"{status.value} on {job.device}")

    monkeypatch.setattr(gpu, "run_worker", run_worker)
    return state


def test_each_gpu_has_its_own_lock_named_by_its_uuid_and_jobs_carry_their_gpus(tmp_path, probes, worker):
    h = _harness(tmp_path, [2, 0])
    assert [(d.index, Path(d.lock).name) for d in h.pool.all] == [(2, f"gpu-{uuid_of(2)}.lock"),
                                                                  (0, f"gpu-{uuid_of(0)}.lock")]
    assert {Path(d.lock).parent for d in h.pool.all} == {tmp_path / "cache" / "locks"}  # one folder, machine-wide
    assert h.arch == "sm_90a" and h.gpu_name == "NVIDIA H200"
    results = [h.evaluate(NAIVE, PROBLEM) for _ in range(4)]
    assert [r.device for r in results] == [2, 0, 2, 0]
    assert [(j.device, j.harness["device_uuid"], Path(j.lock).name) for j in worker.jobs] == \
        [(2, uuid_of(2), f"gpu-{uuid_of(2)}.lock"), (0, uuid_of(0), f"gpu-{uuid_of(0)}.lock")] * 2
    assert all(j.harness["devices"] == [2, 0] for j in worker.jobs)
    assert Job.read(h.write_job(NAIVE, PROBLEM)).device == 2  # a job outside evaluate (avo.bench): the first GPU


def test_sensors_open_the_gpu_by_its_uuid_since_nvml_numbers_the_node_s_gpus_apart_from_cuda(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=2,3 CUDA's GPU 0 is NVML's GPU 2: opened by index, the clock and
    power recorded with a score would be another job's GPU's."""
    from avo.harness.timing import Sensors

    opened = []
    nvml = SimpleNamespace(nvmlInit=lambda: None, NVML_CLOCK_SM=0,
                           nvmlDeviceGetHandleByUUID=lambda u: opened.append(("uuid", u)) or u,
                           nvmlDeviceGetHandleByIndex=lambda i: opened.append(("index", i)) or i,
                           nvmlDeviceGetClockInfo=lambda h, clock: 1980, nvmlDeviceGetPowerUsage=lambda h: 512_000)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert Sensors(0, "9b1f7e0c2d3a4b5c8e9f00112233aabb").read() == (1980.0, 512.0)
    Sensors(1)  # a probe that found no UUID: the index, as CUDA numbers it
    assert opened == [("uuid", "GPU-9b1f7e0c-2d3a-4b5c-8e9f-00112233aabb"), ("index", 1)]


def test_a_gpu_missing_at_start_or_of_another_model_is_one_line_naming_the_setting(tmp_path, probes, monkeypatch):
    with pytest.raises(HarnessUnavailable, match=r"^harness.devices=\[0,5\]: no usable CUDA GPU 5 here "):
        _harness(tmp_path, [0, 5])
    real = gpu.probe_gpu
    monkeypatch.setattr(gpu, "probe_gpu", lambda d=0: {**real(d), "name": "NVIDIA H100" if d else "NVIDIA H200"})
    with pytest.raises(ConfigError, match=r"harness.devices=\[0,1\] mixes NVIDIA H100 and NVIDIA H200: list GPUs "
                                          "of one model"):
        _harness(tmp_path, [0, 1])


def test_a_gpu_that_fails_its_probe_after_a_crash_is_taken_out_and_the_others_go_on(tmp_path, probes, worker,
                                                                                      capsys):
    h = _harness(tmp_path, [0, 1])
    worker.says[1] = Status.CRASHED
    assert h.evaluate(NAIVE, PROBLEM).device == 0
    probes.broken.add(1)  # the crash left GPU 1 unusable
    crashed = h.evaluate(NAIVE, PROBLEM)
    assert (crashed.status, crashed.device) == (Status.CRASHED, 1)  # the candidate's own result is kept
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == ("[avo.harness] GPU 1 (NVIDIA H200) failed the probe after a crashed evaluation "
                    "(CUDA driver error 999): taken out; timing goes on on GPU 0")
    assert [h.evaluate(NAIVE, PROBLEM).device for _ in range(3)] == [0, 0, 0]
    worker.says[0] = Status.TIMEOUT
    probes.broken.add(0)
    with pytest.raises(HarnessUnavailable, match="no usable CUDA GPU 0 here"):  # the last one: as with one GPU
        h.evaluate(NAIVE, PROBLEM)
    with pytest.raises(HarnessUnavailable, match="no GPU of the harness answers any more"):
        h.evaluate(NAIVE, PROBLEM)


def test_a_crash_on_a_gpu_that_still_answers_keeps_it(tmp_path, probes, worker):
    h = _harness(tmp_path, [0, 1])
    worker.says[0] = Status.CRASHED
    assert h.evaluate(NAIVE, PROBLEM).status == Status.CRASHED
    assert [d.alive for d in h.pool.all] == [True, True]
    assert probes.calls == [0, 1, 0]  # at the start, then after the crash


def test_a_gpu_a_worker_cannot_use_is_taken_out_and_the_evaluation_runs_on_another(tmp_path, probes, worker):
    h = _harness(tmp_path, [0, 1])
    worker.says[0] = Status.UNAVAILABLE
    probes.broken.add(0)
    r = h.evaluate(NAIVE, PROBLEM)  # placed on 0, which fails; evaluated on 1
    assert (r.status, r.device) == (Status.OK, 1) and [j.device for j in worker.jobs] == [0, 1]
    worker.says[1] = Status.UNAVAILABLE  # the last GPU, or one that still answers: the environment, as before
    with pytest.raises(HarnessUnavailable, match="unavailable on 1"):
        h.evaluate(NAIVE, PROBLEM)


def test_one_gpu_that_a_worker_cannot_use_stops_the_search_as_before(tmp_path, probes, worker):
    h = _harness(tmp_path, None)
    worker.says[0] = Status.UNAVAILABLE
    with pytest.raises(HarnessUnavailable, match="unavailable on 0"):
        h.evaluate(NAIVE, PROBLEM)
    assert probes.calls == [0]  # no second probe: the worker's own reason is the message


def test_each_gpu_keeps_its_own_spares_started_on_it(tmp_path, probes, monkeypatch):
    used = []

    def run_on_spare(self, spare, job_dir, limits, deadline):
        used.append(spare[0].pid)
        gpu.GpuHarness._end([spare])  # what the worker's exit and its log's move would do
        return EvalResult(Status.OK)

    monkeypatch.setattr(gpu.GpuHarness, "_run_on_spare", run_on_spare)
    h = _harness(tmp_path, [0, 1], spares=1)
    try:
        before = {d.index: [p.pid for p, _, _ in d.spares] for d in h.pool.all}
        for d in h.pool.all:
            (proc, log_path, _), = d.spares
            assert proc.args[-4:] == ["--standby", str(d.index), d.lock, str(h.warm_dir)] and log_path.exists()
        with h.pool.use():  # GPU 0 busy: the evaluation goes to GPU 1, and takes GPU 1's spare
            assert h.evaluate(NAIVE, PROBLEM).device == 1
        # the spares started from now on warm up for the problem just asked for
        assert Job.read(h.warm_dir).problem_of() == PROBLEM
        after = {d.index: [p.pid for p, _, _ in d.spares] for d in h.pool.all}
        assert used == before[1] and after[0] == before[0] and len(after[1]) == 1 and after[1] != before[1]
    finally:
        h.close()
    assert all(d.spares == [] for d in h.pool.all) and not list((tmp_path / "jobs").glob(".spare-*.log"))


def test_the_real_worker_compiles_on_the_gpu_its_job_names(tmp_path, probes):
    """Mode compile needs no GPU: the job, its device and its lock go through the real worker process."""
    pytest.importorskip("cuda.core")
    h = _harness(tmp_path, [0, 1], cache_dir="")
    results = []
    threads = [threading.Thread(target=lambda: results.append(h.evaluate(NAIVE, PROBLEM, mode="compile")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.device for r in results) == [0, 1] and all(r.status == Status.OK for r in results), results
