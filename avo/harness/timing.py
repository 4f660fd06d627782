"""The one timing protocol of AVO: every speed number (search and bench) comes from here.

Per shape, the candidate and the baselines are timed interleaved, in the same process, on the
same inputs and stream: each iteration runs every function once (in a rotating order), each
preceded by an L2 flush (a 256 MB memset outside the events) and bracketed by CUDA events on
the launch stream. Warm-up runs are discarded; iterations adapt to a per-shape time budget so
a slow kernel stays bounded. The statistic is the median, with p10/p90.

A host wall-clock cross-check (device-wide synchronize around back-to-back launches) catches
work the events cannot see, e.g. on another stream. Worker-side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 << 20


@dataclass
class Stats:
    ms: float
    ms_p10: float
    ms_p90: float
    n: int


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

    def once(self, fn, prep=None) -> float:
        """One prepared, flushed, event-timed call (ms); synchronizes."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if prep is not None:
            prep()
        self.flush()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def interleaved(self, fns: dict, warmup: int, iters: int, budget_s: float, min_iters: int = 2,
                    prep: dict | None = None) -> dict[str, Stats]:
        """Median event time of each function; all run in every iteration, order rotating.

        prep[name], if given, runs before that function's flush, outside its events (e.g. new
        input contents and re-poisoned outputs for every timed call of a candidate).
        """
        names, prep = list(fns), prep or {}
        first = {n: self.once(fns[n], prep.get(n)) for n in names}  # also the first warm-up call
        per_iter_s = sum(first.values()) / 1e3
        for _ in range(max(0, min(warmup - 1, int(0.25 * budget_s / max(per_iter_s, 1e-6))))):
            for n in names:
                self.once(fns[n], prep.get(n))
        n_iter = max(min_iters, min(iters, int(budget_s / max(per_iter_s, 1e-6))))
        events = {n: [] for n in names}
        for i in range(n_iter):
            for j in range(len(names)):
                n = names[(i + j) % len(names)]
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if n in prep:
                    prep[n]()
                self.flush()
                start.record()
                fns[n]()
                end.record()
                events[n].append((start, end))
        torch.cuda.synchronize()
        out = {}
        for n, evs in events.items():
            ts = [s.elapsed_time(e) for s, e in evs]
            out[n] = Stats(_quantile(ts, 0.5), _quantile(ts, 0.1), _quantile(ts, 0.9), len(ts))
        return out

    @staticmethod
    def wall_ms(fn, reps: int) -> float:
        """Host wall-clock per call, device-wide synchronize on both sides (sees every stream)."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / reps


def hidden_work(event_ms: float, wall_ms: float) -> bool:
    """Wall-clock far above the events: work ran outside the launch stream's timeline."""
    return wall_ms > 1.5 * event_ms + 0.05


class Sensors:
    """SM clock (MHz) and board power (W) through NVML; None where NVML is unavailable."""

    def __init__(self, device: int):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(device)
        except Exception as e:  # noqa: BLE001 - sensors are optional; say why they are missing
            print(f"timing: NVML unavailable ({type(e).__name__}: {e}); clocks and power not recorded")
            self._nv = None

    def read(self) -> tuple[float | None, float | None]:
        if self._nv is None:
            return None, None
        nv = self._nv
        return (float(nv.nvmlDeviceGetClockInfo(self._h, nv.NVML_CLOCK_SM)),
                nv.nvmlDeviceGetPowerUsage(self._h) / 1e3)
