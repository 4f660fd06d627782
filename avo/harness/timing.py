"""The one timing protocol of AVO: every speed number (search and bench) comes from here.

Per shape, the candidates, the incumbent and the baselines are timed interleaved, in the same
process, on the same inputs and stream. Every iteration first runs `before` (fresh input
contents, a new softmax scale), then every function once in a fresh random order, each preceded
by its `prep` (re-poisoned outputs) and an L2 flush (a 256 MB memset outside the events),
bracketed by CUDA events on the launch stream and followed by its `post` (outside the events:
what the later functions of the iteration must not read, such as another kernel's outputs, is
moved away), then `after` (the checks of that iteration's outputs, enqueued on the same stream).
The first iteration sizes the run to a per-shape time budget (a slow kernel stays bounded) and
`plan` learns the number of launches before the first checks run, so a check can be drawn from
all of them. The number of warm-up iterations is drawn at random, and warm-up iterations are
prepared and checked exactly like timed ones, so a kernel cannot tell which launches count. The
statistic is the median, with p10/p90; the per-iteration samples are kept, so functions timed in
the same iteration can be compared pair by pair (avo.paired). Python's garbage collector is off
while a shape is timed (a collection would stall the host in the middle of a launch).

A host wall-clock cross-check catches work the events cannot see: on one timed iteration,
chosen at random, each function in `wall` is bracketed by device-wide synchronizes (they see
every stream) and timed by the host as well; its outputs are checked like every other launch's.
A suspicion is never a verdict by itself: `wall_times` measures the function again, alone.
Worker-side.
"""
from __future__ import annotations

import functools
import gc
import random
import time
import uuid
from dataclasses import dataclass, field

import torch

from avo.harness.stopwatch import piece

L2_FLUSH_BYTES = 256 << 20


@dataclass
class Stats:
    ms: float
    ms_p10: float
    ms_p90: float
    n: int
    samples: list[float] = field(default_factory=list)  # ms of each timed iteration, in order
    wall: tuple[float, float] | None = None  # (host wall-clock ms, event ms) of the wall-timed launch

    @classmethod
    def of(cls, ts: list[float], wall: tuple[float, float] | None = None) -> "Stats":
        return cls(_quantile(ts, 0.5), _quantile(ts, 0.1), _quantile(ts, 0.9), len(ts), list(ts), wall)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Timer:
    def __init__(self, flush_l2: bool = True):
        self.flush_buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None

    def flush(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def _call(self, fn, prep=None, post=None, wall: bool = False, label: str = "") -> tuple:
        """Enqueue one prepared, flushed, event-bracketed call, then its post: (start, end, host ms or None).
        wall: the call alone on the device, timed by the host too (synchronizes twice)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if prep is not None:
            with piece("poison"):
                prep()
        with piece("flush"):
            self.flush()
        with piece(f"{'wall' if wall else 'launch'}:{label}"):
            if wall:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            host = None
            if wall:
                torch.cuda.synchronize()
                host = (time.perf_counter() - t0) * 1e3
        if post is not None:
            with piece("hide"):
                post()
        return start, end, host

    def interleaved(self, fns: dict, warmup: int, iters: int, budget_s: float, rng: random.Random,
                    prep: dict | None = None, post: dict | None = None, before=None, after=None, plan=None,
                    min_iters: int = 2, wall: set[str] = frozenset()) -> dict[str, Stats]:
        """Per-function Stats over the timed iterations (see the module docstring).

        before(i) and after(i) run around every iteration i, warm-ups included and alike; plan(n) is
        told the number of iterations n before after(0); the functions in `wall` get a host
        wall-clock time on one timed iteration (Stats.wall)."""
        names, prep, post = list(fns), prep or {}, post or {}
        n_warm = rng.randint(max(1, warmup), max(1, 2 * warmup))
        events: dict[str, list] = {n: [] for n in names}
        walled: dict[str, tuple] = {}
        i, n_iter, wall_at = 0, None, None
        collecting = gc.isenabled()
        gc.disable()
        try:
            while n_iter is None or i < n_warm + n_iter:
                if before is not None:
                    before(i)
                order = rng.sample(names, len(names))
                evs = {n: self._call(fns[n], prep.get(n), post.get(n), i == wall_at and n in wall, n) for n in order}
                if n_iter is None:  # the first iteration sizes the run to the budget
                    torch.cuda.synchronize()
                    per_iter_s = sum(s.elapsed_time(e) for s, e, _ in evs.values()) / 1e3
                    n_iter = max(min_iters, min(iters, int(budget_s / max(per_iter_s, 1e-6))))
                    n_warm = max(1, min(n_warm, 1 + int(0.25 * budget_s / max(per_iter_s, 1e-6))))
                    wall_at = rng.randrange(n_warm, n_warm + n_iter)
                    if plan is not None:
                        plan(n_warm + n_iter)
                if after is not None:
                    after(i)
                if i >= n_warm:
                    for n in names:
                        events[n].append(evs[n])
                if i == wall_at:
                    walled = {n: evs[n] for n in wall}
                i += 1
            torch.cuda.synchronize()
        finally:
            if collecting:
                gc.enable()
        return {n: Stats.of([s.elapsed_time(e) for s, e, _ in evs],
                            (walled[n][2], walled[n][0].elapsed_time(walled[n][1])) if n in walled else None)
                for n, evs in events.items()}

    def wall_times(self, fn, prep=None, post=None, repeats: int = 1) -> list[tuple[float, float]]:
        """(host wall-clock ms, event ms) of `repeats` calls of fn, each alone on the device."""
        out, collecting = [], gc.isenabled()
        gc.disable()
        try:
            for _ in range(repeats):
                start, end, host = self._call(fn, prep, post, wall=True, label="again")
                out.append((host, start.elapsed_time(end)))
        finally:
            if collecting:
                gc.enable()
        return out


def hidden_work(event_ms: float, wall_ms: float) -> bool:
    """Wall-clock far above the events: work ran outside the launch stream's timeline."""
    return wall_ms > 1.5 * event_ms + 0.05


def nvml_uuid(driver_uuid: str) -> str:
    """NVML's name of a GPU ("GPU-8-4-4-4-12 hex") from the CUDA driver's UUID as 32 hex digits."""
    return f"GPU-{uuid.UUID(hex=driver_uuid)}"


class Sensors:
    """SM clock (MHz) and board power (W) through NVML; None where NVML is unavailable.

    The GPU is opened by the driver's UUID where the probe found one: NVML numbers every GPU of the
    node whatever CUDA_VISIBLE_DEVICES says, so CUDA's index names another GPU to NVML under Slurm."""

    def __init__(self, device: int, driver_uuid: str = ""):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self._h = (pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid(driver_uuid)) if driver_uuid
                       else pynvml.nvmlDeviceGetHandleByIndex(device))
        except Exception as e:  # noqa: BLE001 - sensors are optional; say why they are missing
            print(f"timing: NVML unavailable ({type(e).__name__}: {e}); clocks and power not recorded")
            self._nv = None

    def read(self) -> tuple[float | None, float | None]:
        if self._nv is None:
            return None, None
        nv = self._nv
        return (float(nv.nvmlDeviceGetClockInfo(self._h, nv.NVML_CLOCK_SM)),
                nv.nvmlDeviceGetPowerUsage(self._h) / 1e3)


@functools.lru_cache(maxsize=None)
def _sensors(device: int, driver_uuid: str) -> Sensors:
    return Sensors(device, driver_uuid)


def sensors(hc: dict) -> Sensors:
    """The harness device's Sensors, opened once per process: NVML's start-up is paid where a worker first
    asks (its warm-up, or its verify stage, under the shared lock), not inside a timed stage."""
    return _sensors(int(hc.get("device", 0)), hc.get("device_uuid", ""))
