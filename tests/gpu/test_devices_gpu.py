"""harness.devices on real GPUs: the probe, the lock per GPU (named by its UUID), a job placed on each
GPU, and every GPU of the node used when several evaluate at once."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avo.config import HarnessConf
from avo.harness import HarnessUnavailable
from avo.harness.gpu import GpuHarness
from avo.types import Problem, Shape, Status

ROOT = Path(__file__).resolve().parents[2]
NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()
PROBLEM = Problem("t", 4, 4, 128, (Shape(1, 256, 256, 4, 4, 128, False),), (Shape(2, 17, 17, 4, 4, 128, True),))

pytestmark = pytest.mark.gpu


def _harness(tmp_path, devices) -> GpuHarness:
    cfg = OmegaConf.structured(HarnessConf(name="gpu", arch="auto", timeout_s=120, devices=devices, spares=1,
                                           cache_dir=str(tmp_path / "cache" / "cubin")))
    try:
        return GpuHarness(cfg, tmp_path / "jobs")
    except HarnessUnavailable as e:
        pytest.skip(str(e))


def _gpus() -> int:
    n = pytest.importorskip("torch").cuda.device_count()
    if n == 0:
        pytest.skip("no CUDA GPU here")
    return n


def test_devices_0_checks_and_times_on_gpu_0(tmp_path):
    h = _harness(tmp_path, [0])
    try:
        (dev,) = h.pool.all
        assert Path(dev.lock).name.startswith("gpu-") and Path(dev.lock).name != "gpu-0.lock"  # named by UUID
        checked = h.evaluate(NAIVE, PROBLEM, mode="check")
        timed = h.evaluate(NAIVE, PROBLEM)
        assert checked.status == timed.status == Status.OK, timed.error + timed.log[-2000:]
        assert (checked.device, timed.device) == (0, 0) and timed.ranked and timed.score
        assert timed.gpu == h.gpu_name and timed.sm_clock_mhz  # NVML read the GPU that ran it
    finally:
        h.close()


def test_a_gpu_that_is_not_there_is_one_line_naming_the_setting(tmp_path):
    n = _gpus()
    cfg = OmegaConf.structured(HarnessConf(name="gpu", devices=[0, n], cache_dir=str(tmp_path / "cubin")))
    with pytest.raises(HarnessUnavailable, match=rf"^harness.devices=\[0,{n}\]: no usable CUDA GPU {n} here "
                                                 rf"\(device {n} requested, {n} visible\)"):
        GpuHarness(cfg, tmp_path / "jobs")


def test_every_gpu_of_the_node_takes_evaluations(tmp_path):
    n = _gpus()
    if n < 2:
        pytest.skip(f"{n} GPU here: spreading needs two or more")
    h = _harness(tmp_path, list(range(n)))
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(h.evaluate(NAIVE, PROBLEM, mode="check")))
                   for _ in range(2 * n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status == Status.OK for r in results), [r.error for r in results]
        assert {r.device for r in results} == set(range(n))
        assert len({d.lock for d in h.pool.all}) == n
    finally:
        h.close()
