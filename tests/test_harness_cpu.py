"""CPU tests of the GPU harness's logic: ABI layout, static gate, reference, checks, timing stats."""
from __future__ import annotations

import ctypes
import io
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avo.harness.abi import FIELD_NAMES, AvoAttnParams
from avo.harness.check import compare
from avo.harness.reference import attention_refs
from avo.harness.static import check_source
from avo.harness.timing import _quantile, hidden_work
from tests.conftest import adversarial_sources

ROOT = Path(__file__).resolve().parents[1]
NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()


def _device_ints(cubin: bytes, symbol: str) -> list[int]:
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(cubin))
    sym = elf.get_section_by_name(".symtab").get_symbol_by_name(symbol)[0]
    data = elf.get_section(sym["st_shndx"]).data()[sym["st_value"]:sym["st_value"] + sym["st_size"]]
    return list(struct.unpack(f"<{len(data) // 4}i", data))


def test_params_layout_matches_the_header():
    """offsetof/sizeof of every AvoAttnParams field, as NVRTC lays it out, equal the ctypes struct."""
    pytest.importorskip("cuda.core")
    from cuda.core import Program, ProgramOptions

    from avo.harness.abi import cuda_include_dir
    from avo.paths import INCLUDE_DIR

    entries = ["sizeof(AvoAttnParams)", "alignof(AvoAttnParams)"] + \
              [f"__builtin_offsetof(AvoAttnParams, {n})" for n in FIELD_NAMES]
    src = ("#include <avo/attention.cuh>\n"
           f"extern \"C\" __device__ const int avo_layout[{len(entries)}] = {{{', '.join(entries)}}};\n"
           "extern \"C\" __global__ void probe(int* out) { out[0] = avo_layout[threadIdx.x]; }\n")
    opts = ProgramOptions(arch="sm_90a", std="c++17", include_path=[str(INCLUDE_DIR), cuda_include_dir()])
    cubin = Program(src, "c++", options=opts).compile("cubin").code
    got = _device_ints(cubin, "avo_layout")
    want = [ctypes.sizeof(AvoAttnParams), 64] + [getattr(AvoAttnParams, n).offset for n in FIELD_NAMES]
    assert dict(zip(entries, got, strict=True)) == dict(zip(entries, want, strict=True))


@pytest.mark.parametrize("snippet, rule", [
    ("cudaStream_t s; cudaStreamCreate(&s);", "streams"),
    ("kernel<<<1, 32>>>(p);", "launches"),
    ('asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));', "clocks"),
    ("long long t = clock64();", "clocks"),
    ('asm("exit;");', "exit"),
    ("attr.accessPolicyWindow.num_bytes = 1;", "L2"),
    ("void* x = malloc(16);", "allocates"),
    ("#include <cstdio>", "header"),
    ('printf("%d", 1);', "printf"),
])
def test_static_gate_rejects(snippet, rule):
    why = check_source(NAIVE + "\n" + snippet + "\n")
    assert why is not None and rule in why
    assert why.startswith(f"line {NAIVE.count(chr(10)) + 2}:")


def test_static_gate_accepts_seed_and_comments():
    assert check_source(NAIVE) is None
    assert check_source(NAIVE + "\n// no cudaStreamCreate or printf( here\n/* clock64() */\n") is None
    assert check_source('printf("debug %d", 1);', allow_printf=True) is None


def _manual(q, k, v, causal):
    sq, sk, d = q.shape[1], k.shape[1], q.shape[3]
    g = q.shape[2] // k.shape[2]
    kk, vv = k.float().repeat_interleave(g, 2), v.float().repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.arange(sk)[None] > torch.arange(sq)[:, None] + sk - sq, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).nan_to_num(0), vv), torch.logsumexp(s, -1)


@pytest.mark.parametrize("sq, sk, hq, hkv, causal", [(17, 17, 4, 2, True), (30, 50, 4, 4, True),
                                                      (50, 30, 4, 1, True), (33, 33, 2, 2, False)])
def test_reference_matches_plain_softmax(sq, sk, hq, hkv, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, h, 64, generator=g).bfloat16() for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    o, lse = attention_refs(q, k, v, causal)[:2]
    mo, mlse = _manual(q, k, v, causal)
    assert (o - mo).abs().max() < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(mlse))
    fin = ~torch.isneginf(mlse)
    assert (lse[fin] - mlse[fin]).abs().max() < 1e-5
    if sq > sk and causal:  # bottom-right aligned: the first sq - sk rows see no key
        assert torch.isneginf(lse[:, :, : sq - sk]).all() and (o[:, : sq - sk] == 0).all()
    rows = torch.tensor([0, sq // 2, sq - 1])
    ro, rl = attention_refs(q, k, v, causal, rows=rows)[:2]
    assert torch.allclose(ro, o[:, rows], atol=1e-6) and torch.allclose(rl, lse[:, :, rows], atol=1e-6, equal_nan=True)


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 70, 2, 64, generator=g).bfloat16() for _ in range(3))
    o, lse = attention_refs(q, k, v, True)[:2]
    return q, k, v, o.bfloat16(), lse


def test_compare_accepts_a_bf16_rounded_reference(case):
    q, k, v, o, lse = case
    ok, err, msg = compare(o, lse, q, k, v, True, 2.0, 1e-4, 1e-3)
    assert ok, msg


@pytest.mark.parametrize("damage, words", [
    (lambda o, lse: o.view(-1).__setitem__(5, float("nan")), "NaN"),
    (lambda o, lse: lse.view(-1).__setitem__(3, float("nan")), "NaN"),
    (lambda o, lse: o.view(-1).__setitem__(7, float("inf")), "Inf"),
    (lambda o, lse: o.mul_(1.05), "max|O - ref|"),
    (lambda o, lse: lse.add_(0.01), "LSE"),
    (lambda o, lse: lse.view(-1).__setitem__(0, float("-inf")), "-inf"),
    (lambda o, lse: o.zero_(), "max|O - ref|"),
])
def test_compare_rejects(case, damage, words):
    q, k, v, o, lse = case
    damage(o, lse)
    ok, _, msg = compare(o, lse, q, k, v, True, 2.0, 1e-4, 1e-3)
    assert not ok and words in msg


def test_quantile_and_hidden_work():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert (_quantile(xs, 0.5), _quantile(xs, 0.0), _quantile(xs, 1.0), _quantile(xs, 0.1)) == (3.0, 1.0, 5.0, 1.4)
    assert not hidden_work(10.0, 10.2)     # launch overhead
    assert hidden_work(0.01, 5.0)          # events saw almost nothing, the device was busy


def test_arch_name():
    from avo.harness.abi import arch_name

    assert [arch_name(*c) for c in ([9, 0], [10, 0], [8, 6])] == ["sm_90a", "sm_100a", "sm_86"]


def test_gpu_harness_unavailable_names_the_cpu_alternative(tmp_path):
    from avo.harness import HarnessUnavailable
    from avo.harness.gpu import probe_gpu

    has_gpu = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"]).returncode == 0
    if has_gpu:
        pytest.skip("a GPU is visible here")
    with pytest.raises(HarnessUnavailable, match="harness=compile"):
        probe_gpu(0)


def test_bench_is_a_hydra_app_that_stops_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "avo.bench", "kernel=mha", "seeds=[naive,sm90]", "kernel.head_dim=64",
                        f"out={tmp_path / 'b'}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("avo.bench: error: seed=sm90 supports head dims [128], not 64; "
                                                 "seeds that do: naive, sm80, sm90_d64, sm90_hdim")
    assert (tmp_path / "b" / ".hydra" / "config.yaml").exists()  # the composed config, beside the results


def test_bench_composes_the_search_config():
    from avo.bench import compose
    from avo.problem import problem_from_cfg

    cfg = compose(["kernel=gqa", "group=8", "harness.bench_budget_s=1.5", "seeds=[naive,sm80]", "profile=first"])
    assert list(cfg.seeds) == ["naive", "sm80"] and cfg.profile == "first" and cfg.out is None
    p = problem_from_cfg(cfg.kernel)
    assert (p.heads_q, p.heads_kv, cfg.harness.name, cfg.harness.arch) == (32, 4, "gpu", "auto")
    assert cfg.harness.bench_budget_s == 1.5 and len(p.bench) == 8


ADVERSARIAL = adversarial_sources()


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_kernels_reach_the_stage_they_target(name):
    """Those expected to be rejected before running are, by the source or the PTX gate; all others
    pass both and compile, so the GPU suite really exercises the run-time defences."""
    pytest.importorskip("cuda.core")
    from avo.config import HarnessConf
    from avo.harness.nvrtc import compile_candidate

    source = ADVERSARIAL[name]
    c = compile_candidate(source, "sm_90a", 128, max_local_bytes=HarnessConf.max_local_bytes)
    if "// expect: compile_error" in source:
        assert not c.ok and c.error.startswith("rejected"), c.error or c.log
        assert "root:" not in c.error + c.log
        where = re.search(r"^// where: (.+)$", source, re.M)
        assert where is None or where[1] in c.error, c.error
    else:
        assert c.ok, c.error + c.log


def test_pack_params_fills_pointers_strides_and_scale():
    from avo.harness.abi import LaunchGeometry, pack_params

    q = torch.zeros(2, 5, 4, 64, dtype=torch.bfloat16)
    k, v = torch.zeros(2, 7, 2, 64, dtype=torch.bfloat16), torch.zeros(2, 7, 2, 64, dtype=torch.bfloat16)
    o, lse, tc = torch.zeros_like(q), torch.zeros(2, 4, 5), torch.zeros(1, dtype=torch.int32)
    spec = LaunchGeometry([128, 0, 64, 0, 0, 0, 1, 1])
    p = pack_params(q, k, v, o, lse, True, 132, tc, spec)
    assert (p.q, p.k, p.v, p.o, p.lse, p.tile_counter) == tuple(t.data_ptr() for t in (q, k, v, o, lse, tc))
    assert (p.q_batch_stride, p.q_row_stride, p.q_head_stride) == (5 * 4 * 64, 4 * 64, 64)
    assert (p.k_batch_stride, p.k_row_stride, p.k_head_stride) == (7 * 2 * 64, 2 * 64, 64)
    assert (p.lse_batch_stride, p.lse_head_stride) == (20, 5)
    assert (p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim, p.causal, p.num_sms) == \
        (2, 4, 2, 5, 7, 64, 1, 132)
    assert p.softmax_scale == pytest.approx(0.125) and p.softmax_scale_log2 == pytest.approx(0.125 * math.log2(math.e))
    assert bytes(p.tma_q) == bytes(128)  # no tensor maps unless the launch spec asks for them


def test_worker_that_dies_or_writes_garbage_is_reported_as_crashed(tmp_path):
    from avo.harness.sandbox import RESULT, run_worker
    from avo.types import Status

    died = run_worker(tmp_path, 30, prefix=[sys.executable, "-c", "import sys; print('dying'); sys.exit(3)"])
    assert died.status == Status.CRASHED and "worker died (exit code 3)" in died.error and "dying" in died.log
    garbage = f"open({str(tmp_path / RESULT)!r}, 'w').write('{{not json')"
    bad = run_worker(tmp_path, 30, prefix=[sys.executable, "-c", garbage])
    assert bad.status == Status.CRASHED and bad.error.startswith("unreadable worker result")


# The grid rule of kernels_cuda/CONTRACT.md, written out by hand: (batch, heads_q, seqlen_q, num_sms,
# block_m, persistent) -> grid. persistent == 0: (ceil(seqlen_q / block_m), heads_q, batch);
# otherwise (num_sms * persistent, 1, 1), whatever the problem size.
CONTRACT_GRIDS = [
    ((2, 16, 4097, 132, 128, 0), (33, 16, 2)),
    ((2, 16, 4096, 132, 128, 0), (32, 16, 2)),
    ((1, 32, 1, 132, 64, 0), (1, 32, 1)),
    ((8, 4, 4097, 132, 64, 0), (65, 4, 8)),
    ((2, 16, 4097, 132, 128, 1), (132, 1, 1)),
    ((1, 32, 1, 132, 128, 2), (264, 1, 1)),
    ((4, 8, 32768, 78, 192, 3), (234, 1, 1)),
]


@pytest.mark.parametrize("args, grid", CONTRACT_GRIDS)
def test_host_and_exported_geometry_follow_the_contracts_grid_rule(args, grid):
    from avo.harness.abi import LaunchGeometry

    batch, heads_q, seqlen_q, num_sms, block_m, persistent = args
    rows = 128 if persistent else 0
    ints = [384, 200_000, block_m, persistent, rows, rows, 1, 1]
    assert LaunchGeometry(ints).grid(batch, heads_q, seqlen_q, num_sms) == grid


@pytest.mark.parametrize("layout", ["contiguous", "packed", "bhsd", "padded"])
def test_check_inputs_and_outputs_cover_the_layouts_a_caller_may_pass(layout):
    from avo.harness.check import Outputs, random_inputs
    from avo.types import Shape

    shape = Shape(2, 33, 33, 4, 2, 64, True)
    q, k, v = random_inputs(shape, torch.Generator().manual_seed(0), "large", layout, device="cpu")
    assert q.shape == (2, 33, 4, 64) and k.shape == v.shape == (2, 33, 2, 64)
    assert all(t.stride(3) == 1 and t.dtype == torch.bfloat16 for t in (q, k, v))
    assert (q.float().abs().max() > 40) and all((t.stride(1) * 2) % 16 == 0 for t in (q, k, v))  # TMA alignment
    if layout != "contiguous":
        assert not all(t.is_contiguous() for t in (q, k, v))
    out = Outputs(shape, device="cpu", layout=layout)
    assert out.o.shape == (2, 33, 4, 64) and out.lse.shape == (2, 4, 33) and out.lse.stride(2) == 1
    assert bool(torch.isnan(out.o).all()) and not bool(out.guards_broken())
    out.o.zero_()
    out.lse.zero_()
    assert not bool(out.guards_broken())  # writing every element of the views touches nothing else
    out._o[-1] = 0.0  # the guard band after O
    assert bool(out.guards_broken())
    if layout == "padded":
        out.poison()
        out.o.zero_()
        first = int(out._o_in.nonzero()[0])
        out._o[first + 64] = 0.0  # right after the first head's 64 elements: padding, not O
        assert bool(out.guards_broken())


def test_compare_judges_rows_and_empty_rows_exactly():
    from avo.harness.reference import attention_refs

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, s, 2, 64, generator=g).bfloat16() for s in (40, 24, 24))  # Sq > Sk: empty rows
    o, lse, _, _ = attention_refs(q, k, v, True, 0.2)
    o = o.bfloat16()
    assert compare(o, lse, q, k, v, True, 2.0, 1e-4, 1e-3, scale=0.2)[0]
    assert not compare(o, lse, q, k, v, True, 2.0, 1e-4, 1e-3)[0]  # the scale matters
    bad = o.clone()
    bad[0, 0, 0, 0] = 1e-6  # row 0 sees no key (bottom-right causal): O must be exactly 0
    ok, _, msg = compare(bad, lse, q, k, v, True, 2.0, 1e-4, 1e-3, scale=0.2)
    assert not ok and "exactly" in msg
    small = o.clone()
    row = 30
    small[0, row] = (small[0, row].float() * 1.03).bfloat16()  # 3 % off on one row only
    ok, _, msg = compare(small, lse, q, k, v, True, 2.0, 1e-4, 1e-3, scale=0.2)
    assert not ok and ("rows wrong" in msg or "max|O - ref|" in msg), msg
