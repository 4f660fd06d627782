"""`python -m avo.export` on CPU: the package it writes, its metadata, and every error path.

The generated package is imported in a child process in which importing avo fails, and its
input checks run through the op's fake (meta) implementation, which needs no GPU.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from avo import lineage
from avo.export import ExportError, export
from avo.search import run_search

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run: the naive seed and a few mutations, compiled with NVRTC (harness=compile)."""
    from conftest import make_cfg

    tmp = tmp_path_factory.mktemp("src")
    cfg = make_cfg("harness=compile", "seed=naive", "search.max_steps=2", "search.attempts_per_step=1",
                   f"harness.cache_dir={tmp / 'cubin'}", run_dir=tmp / "run")
    run_search(cfg)
    return tmp / "run"


@pytest.fixture(scope="module")
def ranked_run(run_dir, tmp_path_factory):
    """A copy of that run with a committed, timed v1 appended (as harness=gpu records one)."""
    copy = tmp_path_factory.mktemp("ranked") / "run"
    shutil.copytree(run_dir, copy)
    return copy, _add_ranked_version(copy)


def _add_ranked_version(run_dir: Path) -> dict:
    seed = lineage.read_run(run_dir).filter(lineage.pl.col("version") == 0).row(0, named=True)
    source = lineage.read_source(run_dir, seed["source_sha"]).replace("ROWS_PER_BLOCK 4", "ROWS_PER_BLOCK 8")
    now = datetime.now(timezone.utc)
    row = {**seed, "step": 9, "attempt": 0, "candidate_id": "00009.00", "version": 1, "decision": "committed",
           "ranked": True, "score": 123.4, "message": "eight rows per block",
           "source_sha": lineage.write_source(run_dir, source),
           "configs": [{"key": "full_b8_s4096_h16-16_d128", "tflops": 150.0, "ms": 1.0, "ms_p10": 0.9, "ms_p90": 1.1,
                        "cudnn_tflops": 500.0, "fa2_tflops": 300.0, "max_err": 1e-3}],
           "gpu": "NVIDIA H100 80GB HBM3", "started_at": now, "finished_at": now}
    lineage.append(run_dir, row)
    return row


def test_exports_a_committed_version_as_a_self_contained_package(run_dir, tmp_path):
    pkg = export(str(run_dir), tmp_path / "attn_pkg", log=lambda s: None)
    names = {p.name for p in pkg.iterdir()}
    assert names == {"__init__.py", "_abi.py", "selftest.py", "kernel.cu", "include", "avo_export.json", "README.md"}
    meta = json.loads((pkg / "avo_export.json").read_text())
    v0 = lineage.read_run(run_dir).filter(lineage.pl.col("version") == 0).row(0, named=True)
    source = (pkg / "kernel.cu").read_text()
    assert source == lineage.read_source(run_dir, v0["source_sha"])
    assert meta["source_sha256"] == hashlib.sha256(source.encode()).hexdigest()
    header = "include/avo/attention.cuh"
    assert (pkg / header).read_bytes() == (ROOT / "kernels_cuda" / header).read_bytes()
    assert (pkg / "_abi.py").read_bytes() == (ROOT / "avo/harness/abi.py").read_bytes()  # verbatim, not a copy by hand
    o = meta["origin"]
    assert o["run_id"] == json.loads((run_dir / "run.json").read_text())["run_id"] and o["version"] == 0
    assert o["kernel"] == "mha" and o["spec"].endswith(":v0") and o["harness"] == "compile"
    assert not o["verified"] and meta["verified_head_dims"] == []  # harness=compile checked no output
    assert meta["head_dims"] == [128] and meta["groups"] == [1]
    assert meta["dtypes"] == ["bfloat16"] and meta["min_capability"] == [9, 0]
    launch = meta["launch"]["128"]
    assert launch["threads"] == 128 and launch["block_m"] == 4 and launch["abi"] == 1
    assert meta["resources"]["128"]["registers"] > 0
    assert "not timed" in (pkg / "README.md").read_text()


def test_best_version_by_default_with_its_score_table(ranked_run, tmp_path):
    run_dir, row = ranked_run
    meta = json.loads((export(str(run_dir), tmp_path / "best", log=lambda s: None) / "avo_export.json").read_text())
    assert meta["origin"]["version"] == 1 and meta["origin"]["score_tflops"] == 123.4 and meta["origin"]["verified"]
    assert meta["verified_head_dims"] == [128] and meta["verified_groups"] == [1]
    assert meta["origin"]["message"] == row["message"] and meta["origin"]["gpu"] == row["gpu"]
    score = meta["scores"][0]
    assert score["key"] == "full_b8_s4096_h16-16_d128" and score["vs_cudnn"] == pytest.approx(0.3)
    assert "| full_b8_s4096_h16-16_d128 | 150.0 | 500.0 | 300.0 |" in (tmp_path / "best" / "README.md").read_text()
    old = json.loads((export(f"{run_dir}:v0", tmp_path / "old", log=lambda s: None) / "avo_export.json").read_text())
    assert old["origin"]["version"] == 0 and "ROWS_PER_BLOCK 4" in (tmp_path / "old" / "kernel.cu").read_text()


def test_extra_head_dims_and_groups_are_compiled_and_marked_unverified(ranked_run, tmp_path):
    run_dir, lines = ranked_run[0], []
    meta = json.loads((export(f"{run_dir}:1", tmp_path / "wide", head_dims=[64, 128], groups=[1, 4],
                              log=lines.append) / "avo_export.json").read_text())
    assert meta["head_dims"] == [64, 128] and set(meta["launch"]) == {"64", "128"} and meta["groups"] == [1, 4]
    assert meta["verified_head_dims"] == [128] and meta["verified_groups"] == [1]
    assert any("not verified" in x and "[64]" in x and "[4]" in x for x in lines)


@pytest.mark.parametrize("spec, out, message", [
    ("{run}:7", "pkg", "no such version"),
    ("/nonexistent/run", "pkg", "not a kernel in kernels_cuda"),
    ("missing.cu", "pkg", "no such file"),
    ("naive", "not-an-identifier", "must be an identifier"),
    ("naive", "pkg", "head dims \\[96\\]"),
])
def test_bad_requests_fail_with_one_clear_message(run_dir, tmp_path, spec, out, message):
    with pytest.raises(ExportError, match=message):
        export(spec.format(run=run_dir), tmp_path / out, head_dims=[96] if "96" in message else None,
               log=lambda s: None)


def test_a_source_that_does_not_compile_is_refused(tmp_path):
    bad = tmp_path / "bad.cu"
    naive = (ROOT / "kernels_cuda/naive/naive.cu").read_text()
    bad.write_text(naive + '\nstatic_assert(AVO_HEAD_DIM == 128, "d128 only");\n')
    with pytest.raises(ExportError, match="head_dim=64"):
        export(str(bad), tmp_path / "pkg", head_dims=[64, 128], log=lambda s: None)
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg*"))


def test_never_overwrites_what_is_not_a_previous_export(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "precious.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty.*--force will not touch it"):
        export("naive", tmp_path / "pkg", force=True, log=lambda s: None)
    assert (tmp_path / "pkg" / "precious.txt").read_text() == "keep"
    export("naive", tmp_path / "new", log=lambda s: None)
    with pytest.raises(ExportError, match="pass --force"):
        export("naive", tmp_path / "new", log=lambda s: None)
    export("sm80", tmp_path / "new", force=True, log=lambda s: None)
    assert json.loads((tmp_path / "new" / "avo_export.json").read_text())["origin"]["spec"] == "kernels_cuda/sm80"


def test_cli_reports_errors_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "avo.export", "nosuchseed", "--out", str(tmp_path / "p")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("avo.export: seed=nosuchseed")
    r = subprocess.run([sys.executable, "-m", "avo.export", "naive", "--out", str(tmp_path / "p"), "--head-dims", "64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "compiled for sm_90a, head_dim=64" in r.stdout and (tmp_path / "p" / "kernel.cu").exists()


CHILD = r"""
import importlib.abc, sys
class NoAvo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "avo" or name.startswith("avo."):
            raise ImportError("avo must not be needed by an exported package")
sys.meta_path.insert(0, NoAvo())
sys.path.insert(0, sys.argv[1])
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import pkg

def bf16(*shape, device="cuda"):
    return torch.empty(*shape, dtype=torch.bfloat16, device=device)

def expect(exc, match, *args, **kw):
    try:
        pkg.attention_with_lse(*args, **kw)
    except exc as e:
        assert match in str(e), (match, str(e))
        print("ok", exc.__name__, "|", e)
        return
    raise AssertionError(f"no {exc.__name__} for {match!r}")

assert "avo" not in sys.modules
q = bf16(2, 17, 8, 128, device="cpu")
expect(ValueError, "on cpu; the kernel runs on CUDA", q, q, q)
expect(TypeError, "bfloat16", q.float(), q, q)
expect(ValueError, "4-D", q[0], q, q)
with FakeTensorMode():  # CUDA tensors without a GPU: the checks run in the op's fake implementation
    q, k = bf16(2, 17, 8, 128), bf16(2, 33, 4, 128)
    out, lse = pkg.attention_with_lse(q, k, k, causal=True)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 8, 17) and lse.dtype == torch.float32
    expect(ValueError, "same shape", q, k, bf16(2, 32, 4, 128))
    expect(ValueError, "differ in batch or head_dim", q, bf16(3, 33, 4, 128), bf16(3, 33, 4, 128))
    strided = torch.empty_strided((2, 33, 4, 128), (33 * 4 * 256, 4 * 256, 256, 2), dtype=torch.bfloat16, device="cuda")
    expect(ValueError, "stride 2 in its last dimension", q, k, strided)
    expect(ValueError, "do not divide", q, bf16(2, 33, 3, 128), bf16(2, 33, 3, 128))
    expect(pkg.UnsupportedError, "head_dim=96", bf16(2, 17, 8, 96), bf16(2, 33, 4, 96), bf16(2, 33, 4, 96))
    expect(pkg.UnsupportedError, "group 8", q, bf16(2, 33, 1, 128), bf16(2, 33, 1, 128))
    expect(ValueError, "empty input", bf16(2, 0, 8, 128), k, k)
    expect(ValueError, "one device", q, k, bf16(2, 33, 4, 128, device="cuda:1"))
    expect(ValueError, "scale=-1.0", q, k, k, scale=-1.0)
print("meta", pkg.metadata()["origin"]["spec"], pkg.OP_NAME)
print("avo imported:", any(m == "avo" or m.startswith("avo.") for m in sys.modules))
"""


def test_package_imports_without_avo_and_rejects_bad_inputs(tmp_path):
    export("naive", tmp_path / "pkg", head_dims=[64, 128], groups=[1, 2, 4], log=lambda s: None)
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("\nok ") + r.stdout.startswith("ok ") == 12
    assert "avo imported: False" in r.stdout and "avo_export::attention_" in r.stdout
