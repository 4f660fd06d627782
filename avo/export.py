"""Export a discovered kernel as a standalone PyTorch op package.

    python -m avo.export <run dir>[:<version>] --out <dir>   # a committed version (the best: avo.history)
    python -m avo.export sm90 --out <dir>                      # or a seed in kernels_cuda/, or a .cu file

<dir> becomes an importable Python package named after its last component. It needs only torch
and cuda-python at run time (never avo): the kernel source and the ABI header, the launch metadata
(avo_export.json), the self-contained ABI module (a verbatim copy of avo/harness/abi.py) and
the op module (avo/export_template/op.py). See the package's README.md for its API.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from string import Template

from avo.errors import ExportError, SeedError, one_line
from avo.harness.nvrtc import compile_candidate
from avo.paths import INCLUDE_DIR
from avo.problem import HEAD_DIMS

TEMPLATE_DIR = Path(__file__).resolve().parent / "export_template"
ABI_MODULE = Path(__file__).resolve().parent / "harness" / "abi.py"
META_FILE = "avo_export.json"
SOURCE_FILE = "kernel.cu"
FORMAT = 1


def _resolve(spec: str):
    from avo.seeds import resolve

    try:
        return resolve(spec)
    except SeedError as e:
        raise ExportError(str(e)) from None


def _origin(seed) -> dict:
    """Where the source comes from and what the search verified it for."""
    if seed.run_dir is None:
        head_dims = seed.meta.get("head_dims", [128])
        return {"spec": seed.origin, "run_dir": None, "verified": False, "head_dims": list(head_dims),
                "groups": [1], "scores": []}
    import polars as pl

    from avo import history, lineage

    info = lineage.read_run_info(seed.run_dir) or {}
    row = history.chains(lineage.read_run(seed.run_dir)).filter(pl.col("version") == seed.version).row(0, named=True)
    scores = [{**c, "vs_cudnn": (c["tflops"] / c["cudnn_tflops"] if c["tflops"] and c["cudnn_tflops"] else None)}
              for c in row["configs"] or []]
    return {"spec": seed.origin, "run_dir": str(Path(seed.run_dir).resolve()), "run_id": row["run_id"],
            "version": row["version"], "candidate_id": row["candidate_id"], "message": row["message"],
            "kernel": row["kernel"], "heads_q": row["heads_q"], "heads_kv": row["heads_kv"],
            "harness": info.get("harness"), "gpu": row["gpu"], "score_tflops": row["score"],
            # what the lineage proved: its speed over v0, timed side by side along its chain (avo.history)
            "over_v0": [row[c] for c in history.CHAIN] if row["chain_ratio"] is not None else None,
            "ranked": row["ranked"], "committed_at": row["finished_at"].isoformat() if row["finished_at"] else None,
            # harness=compile checks no output: only a GPU run's version was verified for its variant
            "verified": bool(row["ranked"]) or info.get("harness") == "gpu", "head_dims": [row["head_dim"]],
            "groups": [row["group"]], "scores": scores}


def _checked(seed) -> tuple[int, dict]:
    """(the local-memory bound, the op's envelope) of the harness the source was verified with: its
    run's configuration, or the defaults (a seed or a file is held to what a run would check)."""
    from avo import lineage
    from avo.config import BenchSetConf, HarnessConf
    from avo.harness.envelope import envelope

    cfg = ((lineage.read_run_info(seed.run_dir) or {}).get("config") or {}) if seed.run_dir is not None else {}
    bench = (cfg.get("kernel") or {}).get("bench") or {}
    harness = cfg.get("harness") or {}
    return (int(harness.get("max_local_bytes", HarnessConf.max_local_bytes)),
            envelope(bench.get("seqlens") or BenchSetConf().seqlens))


def _avo_version() -> str:
    try:
        return dist_version("avo")
    except PackageNotFoundError:
        return "source tree"


def _compile_all(source: str, head_dims: list[int], arch: str, log, max_local_bytes: int) -> tuple[dict, dict]:
    """Compiled behind the harness's gates and bounds (avo.harness.nvrtc), as the search compiles."""
    launch, resources = {}, {}
    for d in head_dims:
        c = compile_candidate(source, arch, d, max_local_bytes=max_local_bytes)
        if not c.ok:
            raise ExportError(f"the source does not compile for head_dim={d} on {arch}: {c.error}\n{c.log[-3000:]}")
        launch[str(d)] = vars(c.launch)
        resources[str(d)] = {"registers": c.registers, "spill_bytes": c.spill_bytes, "stack_bytes": c.stack_bytes}
        log(f"compiled for {arch}, head_dim={d}: {c.registers} registers, {c.spill_bytes} spill bytes, "
            f"{c.launch.threads} threads, {c.launch.smem} B shared memory")
    return launch, resources


def _capability(arch: str) -> list[int]:
    digits = arch.removeprefix("sm_").rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        raise ExportError(f"--arch {arch}: expected e.g. sm_90a or sm_80")
    return [int(digits[:-1]), int(digits[-1])]


def export(spec: str, out: str | os.PathLike, head_dims: list[int] | None = None, groups: list[int] | None = None,
           arch: str = "sm_90a", force: bool = False, log=print) -> Path:
    """Write the package; returns its directory. Raises ExportError with one actionable message."""
    out = Path(out).expanduser().resolve()
    if not out.name.isidentifier():
        raise ExportError(f"--out {out}: the last component names the Python package and must be an identifier "
                          "(letters, digits, underscores; e.g. --out exported/avo_attention)")
    if out.exists() and any(out.iterdir()) and not (force and (out / META_FILE).exists()):
        raise ExportError(f"--out {out} exists and is not empty" + (
            "; pass --force to replace a previous export there" if (out / META_FILE).exists() else
            " (and holds no previous export, so --force will not touch it either)"))
    seed = _resolve(str(spec))
    log(f"exporting {seed.origin}" + (f" ({seed.note})" if seed.note else ""))
    origin = _origin(seed)
    verified_dims, verified_groups = origin.pop("head_dims"), origin.pop("groups")
    head_dims = sorted(set(head_dims or verified_dims))
    groups = sorted(set(groups or verified_groups))
    if any(d not in HEAD_DIMS for d in head_dims) or any(g < 1 for g in groups):
        raise ExportError(f"head dims {head_dims} must be among {', '.join(map(str, HEAD_DIMS))}, "
                          f"groups {groups} positive")
    max_local_bytes, limits = _checked(seed)
    launch, resources = _compile_all(seed.source, head_dims, arch, log, max_local_bytes)
    meta = {
        "format": FORMAT, "package": out.name, "source_file": SOURCE_FILE,
        "source_sha256": hashlib.sha256(seed.source.encode()).hexdigest(), "abi": next(iter(launch.values()))["abi"],
        "dtypes": ["bfloat16"], "layout": "q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), last dim contiguous",
        "head_dims": head_dims, "groups": groups, "verified_head_dims": verified_dims if origin["verified"] else [],
        "verified_groups": verified_groups if origin["verified"] else [], "export_arch": arch,
        "min_capability": _capability(arch), "launch": launch, "resources": resources, "envelope": limits,
        "origin": origin,
        "scores": origin.pop("scores"), "exported_at": datetime.now(timezone.utc).isoformat(),
        "exported_with": f"avo {_avo_version()}",
    }
    new_dims = sorted(set(head_dims) - set(meta["verified_head_dims"]))
    new_groups = sorted(set(groups) - set(meta["verified_groups"]))
    if new_dims or new_groups:
        log(f"warning: not verified by the search (compiled only; run the package's selftest on a GPU): "
            f"head dims {new_dims}, groups {new_groups}")
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, seed.source, meta)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    log(f"use it: sys.path.insert(0, {str(out.parent)!r}); from {out.name} import attention")
    return out


def _write(pkg: Path, source: str, meta: dict) -> None:
    (pkg / "include").mkdir(parents=True)
    shutil.copytree(INCLUDE_DIR, pkg / "include", dirs_exist_ok=True)
    (pkg / SOURCE_FILE).write_text(source)
    shutil.copyfile(ABI_MODULE, pkg / "_abi.py")
    shutil.copyfile(TEMPLATE_DIR / "op.py", pkg / "__init__.py")
    shutil.copyfile(TEMPLATE_DIR / "selftest.py", pkg / "selftest.py")
    (pkg / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    o = meta["origin"]
    table = "\n".join(f"| {c['key']} | {c['tflops']:.1f} | {c['cudnn_tflops'] or float('nan'):.1f} | "
                      f"{c['fa2_tflops'] or float('nan'):.1f} |" for c in meta["scores"] if c.get("tflops"))
    readme = Template((TEMPLATE_DIR / "README.md").read_text()).substitute(
        package=meta["package"], origin=o["spec"], message=o.get("message") or "-", gpu=o.get("gpu") or "-",
        head_dims=meta["head_dims"], groups=meta["groups"], sha=meta["source_sha256"][:16],
        scores=table or "| (not timed: the source run ranked nothing) | | | |")
    (pkg / "README.md").write_text(readme)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 64,128") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avo.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="<run dir>[:<version>], a seed name in kernels_cuda/, or a .cu file")
    ap.add_argument("--out", required=True, help="package directory to write (its name is the import name)")
    ap.add_argument("--head-dims", type=_ints, help="head dims to support (default: those the run verified)")
    ap.add_argument("--groups", type=_ints, help="GQA groups to accept (default: the one the run verified)")
    ap.add_argument("--arch", default="sm_90a", help="architecture to check compilation for (default sm_90a)")
    ap.add_argument("--force", action="store_true", help="replace a previous export at --out")
    args = ap.parse_args(argv)
    try:
        export(args.spec, args.out, args.head_dims, args.groups, args.arch, args.force)
    except (ExportError, OSError) as e:
        line = one_line(e, (ExportError,))
        if line is None:
            raise
        print(f"avo.export: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
