"""CPU tests of the harness's cost cuts: each computes what the code it replaced computed."""
from __future__ import annotations

import math

import pytest
import torch

from avo.harness.check import logit_bound
from avo.harness.reference import attention_refs


def _refs_pair_by_pair(q, k, v, causal, scale=None, rows=None, heads_per_chunk=4):
    """attention_refs as it was: a loop over batches and chunks of four heads (the oracle)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    row_idx = rows if rows is not None else torch.arange(sq)
    qs, n = q[:, row_idx], len(row_idx)
    out, out_bf = torch.empty(b, n, hq, d), torch.empty(b, n, hq, d)
    lse = torch.empty(b, hq, n)
    mask = torch.arange(sk)[None, :] > (row_idx[:, None] + sk - sq) if causal else None
    for bi in range(b):
        for h0 in range(0, hq, heads_per_chunk):
            hs = slice(h0, min(h0 + heads_per_chunk, hq))
            kv_heads = torch.arange(hs.start, hs.stop) // group
            qh = qs[bi, :, hs].transpose(0, 1).float()
            kh, vh = (t[bi][:, kv_heads].transpose(0, 1).float() for t in (k, v))
            s = torch.matmul(qh, kh.transpose(1, 2)) * scale
            if mask is not None:
                s.masked_fill_(mask, float("-inf"))
            m = s.amax(dim=-1, keepdim=True)
            m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m_safe)
            denom = p.sum(dim=-1, keepdim=True)
            lse[bi, hs] = (torch.log(denom) + m_safe).squeeze(-1)
            p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
            out[bi, :, hs] = torch.matmul(p, vh).transpose(0, 1)
            out_bf[bi, :, hs] = torch.matmul(p.bfloat16().float(), vh).bfloat16().float().transpose(0, 1)
    return out, lse, out_bf


def _bound_pair_by_pair(q, k, scale, rows=None):
    b, hq, hkv = q.shape[0], q.shape[2], k.shape[2]
    qs = q if rows is None else q[:, rows]
    out = torch.empty(b, hq, qs.shape[1])
    for bi in range(b):
        for h in range(hq):
            out[bi, h] = (qs[bi, :, h].float().abs() @ k[bi, :, h // (hq // hkv)].float().abs().T).amax(-1)
    return scale * out


@pytest.mark.parametrize("b, sq, sk, hq, hkv, causal, rows", [
    (2, 37, 37, 4, 4, False, None), (3, 50, 30, 6, 2, True, None), (2, 30, 70, 4, 1, True, [0, 5, 29]),
    (1, 129, 129, 2, 2, True, [0, 64, 128])])
@pytest.mark.parametrize("budget", [1, 5000, 2 ** 26])
def test_batched_reference_and_bound_match_the_pair_by_pair_loop(b, sq, sk, hq, hkv, causal, rows, budget):
    """Chunks of (batch, head) pairs, one pair to all of them at once, give the loop's truth, its BF16
    answer (to one BF16 ulp: P may round the other way) and its LSE bound, rows with no visible key included."""
    gen = torch.Generator().manual_seed(b * sq + sk)
    q, k, v = (torch.randn(b, s, h, 64, generator=gen).bfloat16() for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    r = None if rows is None else torch.tensor(rows)
    o, lse, o_bf, lse_bf = attention_refs(q, k, v, causal, 0.3, r, budget=budget)
    want_o, want_lse, want_bf = _refs_pair_by_pair(q, k, v, causal, 0.3, r)
    assert o.shape == want_o.shape and o.is_contiguous() and lse.shape == want_lse.shape and lse_bf is lse
    assert torch.allclose(o, want_o, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    assert torch.allclose(lse[fin], want_lse[fin], rtol=1e-6, atol=1e-6)
    assert ((o_bf - want_bf).abs() <= want_bf.abs() * 2 ** -8 + 1e-6).all()
    if causal and sq > sk and r is None:  # bottom-right aligned: the first rows see no key
        assert (o[:, : sq - sk] == 0).all() and torch.isneginf(lse[:, :, : sq - sk]).all()
    assert torch.allclose(logit_bound(q, k, 0.3, r), _bound_pair_by_pair(q, k, 0.3, r), rtol=1e-6)


def _flags_as_they_were(out, kern, mine, pristine, ref, tol):
    o, lse = out.o, out.lse
    ref_o, ref_lse = ref
    tol_rel, atol, lse_tol = tol
    diff = (o.float() - ref_o.float()).abs().amax(-1)
    mag = ref_o.float().abs().amax(-1)
    changed = torch.stack([(a != b).any() for a, b in zip(mine, pristine, strict=True)]).any()
    guards = out.guards_broken() | kern.guards_broken()
    return torch.stack([torch.isnan(o).any() | torch.isnan(lse).any(), torch.isinf(o).any(),
                        (diff > tol_rel * mag + atol).any(), ((lse - ref_lse).abs() > lse_tol).any(),
                        changed, guards])


@pytest.mark.parametrize("damage", ["none", "row", "nan", "inf", "ref_nan", "tiny"])
def test_the_per_launch_flags_are_those_of_the_old_formula(damage):
    """Fewer passes over O (benchmark._flags), the same flags, whatever the output holds."""
    from avo.harness import benchmark as bm
    from avo.harness.check import Outputs
    from avo.types import Shape

    shape = Shape(2, 33, 33, 3, 3, 64, False)
    gen = torch.Generator().manual_seed(7)
    out = Outputs(shape, "cpu")
    ref_o = torch.randn(2, 33, 3, 64, generator=gen).bfloat16()
    ref_lse = torch.randn(2, 3, 33, generator=gen)
    out.o.copy_(ref_o.float() * (1 + 1e-3 * torch.randn(2, 33, 3, 64, generator=gen)))
    out.lse.copy_(ref_lse)
    if damage == "row":
        out.o[1, 5, 2] *= 1.5
    elif damage == "nan":
        out.o[0, 0, 0, 0] = float("nan")
    elif damage == "inf":
        out.o[1, 1, 1, 1] = float("inf")
    elif damage == "ref_nan":
        ref_o[0, 3, 1, 7] = float("nan")
    elif damage == "tiny":
        out.o.mul_(1e-30)
    kern = type("K", (), {"guards_broken": lambda self: torch.tensor(False)})()
    x = tuple(torch.randn(4, generator=gen) for _ in range(3))
    for tol in ((0.01, 1e-4, 1e-3), (0.6, 1e-4, 1e-3)):
        got = bm._flags(out, kern, x, x, (ref_o, ref_lse), tol)
        assert torch.equal(got, _flags_as_they_were(out, kern, x, x, (ref_o, ref_lse), tol)), (damage, tol, got)


class _Flash:
    """sdpa_baseline's stand-in: exact attention, counting its calls (the probe included)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, name, q, k, v, causal, scale):
        def run():
            self.calls += 1
            o, lse, _, _ = attention_refs(q, k, v, causal, scale())
            return o.bfloat16(), lse
        run()
        return run


def test_fa2_is_called_beside_an_incumbent_only_when_the_incumbent_fails_the_fp32_check(monkeypatch):
    import random

    from avo.harness import benchmark as bm
    from tests.test_harness_bench import HC, SHAPE, Attention, Timer

    def run(incumbent):
        flash = _Flash()
        monkeypatch.setattr(bm, "sdpa_baseline", flash)
        kernels = {"candidate": Attention(), "incumbent": incumbent}
        stage = bm._Shape(kernels, SHAPE, HC, lambda line: None, {"candidate"}, Timer(), random.Random(0),
                          torch.Generator().manual_seed(0), [], "incumbent")
        return stage, stage.run()[1], flash.calls

    stage, problems, calls = run(Attention())
    assert calls == 0 and stage.ref_name == "incumbent" and problems["candidate"][0] == ""
    stage, problems, calls = run(Attention(lambda n, o: o.mul_(1.1)))  # wrong: FA2 becomes the reference
    assert stage.ref_name == "flash" and problems["candidate"][0] == "" and calls == 1 + Timer().launches


def test_the_stopwatch_is_a_no_op_unless_started_and_files_pieces_under_their_parents():
    from avo.harness import stopwatch as sw

    assert sw.piece("x") is sw.piece("y")  # one shared no-op
    syncs = []
    watch = sw.start(lambda: syncs.append(1))
    try:
        with sw.piece("evaluation"):
            for shape in ("@a", "@b"):
                with sw.piece("bench"), sw.piece(shape), sw.piece("launch:candidate"):
                    pass
    finally:
        assert sw.stop() is watch
    assert set(watch.totals) == {"evaluation", "evaluation/bench", "evaluation/bench/@a", "evaluation/bench/@b",
                                 "evaluation/bench/@a/launch:candidate", "evaluation/bench/@b/launch:candidate"}
    assert len(syncs) == 2 * 7 and watch.totals["evaluation/bench"][0] == 2
    folded = sw.merged(watch.totals)
    assert folded["evaluation/bench/@*"][0] == 2 and folded["evaluation/bench/@*/launch:candidate"][0] == 2


def test_the_cost_table_nests_pieces_slowest_first_with_the_rest_of_each_parent():
    from avo.harness.stopwatch import render, rows

    totals = {"evaluation": [2, 10.0], "evaluation/bench": [2, 6.0], "evaluation/verify": [2, 3.0],
              "evaluation/bench/launch:candidate": [20, 4.0], "evaluation/bench/x/orphan": [4, 1.0],
              "process/warm-up": [1, 0.5]}
    table = rows(totals, evaluations=2)
    assert [r.piece for r in table] == [
        "evaluation", "evaluation/bench", "evaluation/bench/launch:candidate", "evaluation/bench/x/orphan",
        "evaluation/bench/(rest)", "evaluation/verify", "evaluation/(rest)", "process/warm-up"]
    by = {r.piece: r for r in table}
    assert by["evaluation/bench/(rest)"].total_s == pytest.approx(1.0)
    assert by["evaluation/(rest)"].total_s == pytest.approx(1.0) and by["evaluation/(rest)"].share == pytest.approx(0.1)
    assert by["evaluation/bench"].per_eval_s == 3.0 and by["process/warm-up"].share == 0.05
    text = render(table)
    assert text.splitlines()[0].startswith("piece") and "\n    launch:candidate " in text and "60.0%" in text
    assert "\n    orphan " in text and "\nwarm-up " in text  # indented by the pieces shown around it


def test_nvml_is_opened_once_per_process_and_device(monkeypatch):
    """benchmark() ran Sensors() (nvmlInit and a handle) inside every timed stage; the worker now opens it once,
    before the exclusive lock."""
    import sys
    from types import SimpleNamespace

    from avo.harness import timing

    inits = []
    nvml = SimpleNamespace(nvmlInit=lambda: inits.append(1), nvmlDeviceGetHandleByIndex=lambda i: i,
                           nvmlDeviceGetHandleByUUID=lambda u: u)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    timing._sensors.cache_clear()
    try:
        first = timing.sensors({"device": 0})
        assert timing.sensors({"device": 0, "device_uuid": ""}) is first and len(inits) == 1
        assert timing.sensors({"device": 1}) is not first and len(inits) == 2
    finally:
        timing._sensors.cache_clear()


def test_the_harness_names_its_pieces_while_a_stopwatch_runs(monkeypatch):
    """Verify (truths ahead and after) and a benchmark shape, run with the stopwatch on: the pieces
    benchmarks/eval_cost.py reports, and the same verdicts as with it off."""
    import random

    from avo.harness import benchmark as bm
    from avo.harness import envelope, stopwatch
    from avo.harness.verify import Checks
    from avo.types import Problem, Shape
    from tests.test_harness_bench import HC, SHAPE, Attention, Timer
    from tests.test_harness_checks import HC as CHECK_HC
    from tests.test_harness_checks import Attention as CheckAttention

    monkeypatch.setattr(envelope, "LONG_MIN", 200)  # the real cases at CPU sizes (test_harness_checks' `small`)
    monkeypatch.setattr(envelope, "FAR_STRIDE", 2**18 + 64)
    bench = tuple(Shape(1, 128, 128, 2, 2, 64, c) for c in (False, True))
    problem = Problem("t", 2, 2, 64, bench, tuple(Shape(2, 17, 17, 2, 2, 64, c) for c in (False, True)))
    watch = stopwatch.start()
    try:
        with stopwatch.piece("evaluation"), stopwatch.piece("compile"):
            checks = Checks(problem, CHECK_HC, seed=1, device="cpu")
            checks.prepare(None, stop=lambda: len(checks.truths) >= 3)
        with stopwatch.piece("evaluation"), stopwatch.piece("verify"):
            assert checks.run(CheckAttention(), log=lambda line: None).ok
        monkeypatch.setattr(bm, "sdpa_baseline", _Flash())
        with stopwatch.piece("evaluation"), stopwatch.piece("bench"), stopwatch.piece(f"@{SHAPE.key}"):
            stage = bm._Shape({"candidate": Attention(), "incumbent": Attention()}, SHAPE, HC, lambda line: None,
                              {"candidate"}, Timer(), random.Random(0), torch.Generator().manual_seed(0), [],
                              "incumbent")
            assert stage.run()[1]["candidate"][0] == ""
    finally:
        stopwatch.stop()
    names = set(stopwatch.merged(watch.totals))
    for piece in ("compile/draw", "compile/truth to host", "verify/draw", "verify/place", "verify/launch",
                  "verify/guards and inputs", "verify/truth to device", "verify/judge", "verify/module check",
                  "bench/@*/alloc", "bench/@*/inputs", "bench/@*/reference", "bench/@*/truth", "bench/@*/checks",
                  "bench/@*/module check"):
        assert f"evaluation/{piece}" in names, (piece, sorted(names))
    assert any(n.startswith("evaluation/compile/truth:") for n in names)
    assert any(n.startswith("evaluation/verify/truth:") for n in names)  # those not computed ahead


def _eval_cost():
    from tests.conftest import benchmark_module

    return benchmark_module("eval_cost")


def test_eval_cost_sums_each_lock_once_and_writes_its_tables(tmp_path, capsys):
    import json

    from avo.types import Problem, Shape

    ec = _eval_cost()
    one = {"evaluation": [1, 6.0], "evaluation/compile": [1, 1.5], "evaluation/compile/truth:4097x4097": [8, 0.2],
           "evaluation/compile/truth to host": [8, 0.05], "evaluation/compile/module load": [1, 0.01],
           "evaluation/verify": [1, 0.4], "evaluation/verify/judge": [60, 0.1], "evaluation/incumbent": [1, 0.2],
           "evaluation/incumbent/module load": [1, 0.01], "evaluation/screen": [1, 0.1],
           "evaluation/bench": [1, 1.2], "evaluation/bench/@full": [1, 1.1],
           "evaluation/bench/@full/launch:candidate": [13, 0.5],
           "evaluation/baselines": [1, 2.0], "evaluation/baselines/first calls": [1, 0.5]}
    merged = {k: list(v) for k, v in one.items()}
    assert ec.held(merged, ec.EXCLUSIVE) == pytest.approx(3.3)
    assert ec.held(merged, ec.SHARED) == pytest.approx(0.2 + 0.05 + 0.01 + 0.4 + 0.01 + 0.5)
    results = [{"instrumented": True, "wall_s": 6.0, "compile_s": 1.5, "verify_s": 0.4, "screen_s": 0.1,
                "bench_s": 3.2, "timed_kernels_s": {"candidate": 0.4, "incumbent": 0.4}}]
    process = {"process/context start-up": [1, 0.4], "process/spare warm-up": [2, 0.05],
               "process/context reset": [1, 0.1]}
    problem = Problem("mha", 16, 16, 128, (Shape(8, 4096, 4096, 16, 16, 128, False),), ())
    ec.report([one, one], results, process, False, tmp_path / "cost.json", problem)
    text = capsys.readouterr().out
    assert "exclusive lock 2.800 s" in text and "each shape" in text and "context start-up" in text
    saved = json.loads((tmp_path / "cost.json").read_text())
    assert saved["evaluations"] == 2 and saved["exclusive_s"] == pytest.approx(2.8)
    assert {r["piece"] for r in saved["rows"]} >= {"evaluation/bench/@*/launch:candidate", "process/context reset"}


def test_eval_cost_without_cuda_stops_with_one_line():
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "eval_cost.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "eval_cost.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on the GPU machine: "
        "bash benchmarks/cost_device.sh"]


def test_the_baselines_first_calls_hold_the_lock_shared_and_the_pass_exclusively(monkeypatch):
    """cuDNN builds its plans at a shape's first call (0.3 s, the GPU idle): that is done under the shared lock,
    shape by shape, before the timed pass takes the lock alone; bench_s adds both, not the waits."""
    import contextlib

    from avo.harness import evaluate as ev
    from avo.harness.benchmark import Bench
    from avo.types import ConfigResult, EvalResult, Problem, Shape, Status

    events = []

    @contextlib.contextmanager
    def lock(path, exclusive, wait=True):
        events.append("exclusive" if exclusive else "shared")
        yield True
        events.append("release")

    shapes = tuple(Shape(1, s, s, 2, 2, 64, c) for s in (64, 128) for c in (False, True))
    monkeypatch.setattr(ev, "gpu_lock", lock)
    monkeypatch.setattr(ev, "random_inputs", lambda shape, gen: (None, None, None))
    monkeypatch.setattr(ev, "sdpa_baseline", lambda name, *a: events.append(f"first {name}"))
    cpu_generator = torch.Generator
    monkeypatch.setattr(ev.torch, "Generator", lambda device=None: cpu_generator())
    monkeypatch.setattr(ev.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(ev.time, "sleep", lambda s: None)

    def timed(kernels, shapes_, hc, log, checked):
        events.append("pass")
        return Bench({"candidate": [ConfigResult(s.key, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 0.0) for s in shapes_]})

    monkeypatch.setattr(ev, "benchmark", timed)
    res = EvalResult(Status.OK, bench_s=1.0, configs=[ConfigResult(s.key, 1.0, 1.0, 1.0, 1.0) for s in shapes])
    phases = []
    ev._baselines(object(), Problem("t", 2, 2, 64, shapes, ()), {"baselines": ["cudnn", "flash"],
                  "baseline_fraction": 0.0}, res, lambda line: None, None, "lock", phases.append)
    one_shape = ["shared", "first cudnn", "first flash", "release"]
    assert events == one_shape * len(shapes) + ["exclusive", "pass", "release"]
    assert [c.cudnn_tflops for c in res.configs] == [2.0] * 4 and res.bench_s > 1.0
    assert phases[-1] == "bench" and "wait" in phases
