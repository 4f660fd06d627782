"""NVRTC compilation: source -> PTX + cubin + ptxas resource report, behind the two gates.

One NVRTC run for a real architecture (sm_90a) yields both the PTX, which the PTX gate judges,
and the cubin built from exactly that PTX. Runs inside the worker process (generated code never
compiles in the search process), whose compile phase has its own time limit.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from avo.contract import ContractError, LaunchGeometry, launch_from_cubin
from avo.harness.ptxgate import check_ptx
from avo.harness.static import check_source
from avo.paths import INCLUDE_DIR

SOURCE_NAME = "candidate.cu"  # what diagnostics call the candidate (never a path on this machine)

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Compiled:
    ok: bool
    log: str
    cubin: bytes = b""
    ptx: str = ""
    launch: LaunchGeometry | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    spill_bytes: int | None = None  # stores + loads, as ptxas reports
    cached: bool = False
    error: str = ""


def cuda_include_dir() -> str:
    import cuda.pathfinder as pf

    return str(pf.find_nvidia_header_directory("cudart"))


def nvrtc_version() -> tuple[int, int]:
    """Loads NVRTC; raises RuntimeError with one line where it is missing (a broken environment)."""
    try:
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load the library means the same thing
        raise RuntimeError(f"NVRTC cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                           "install cuda-bindings with the NVRTC wheels (pip install -e '.[nvrtc]')") from None
    if int(err):
        raise RuntimeError(f"NVRTC does not answer (nvrtcVersion: {err})")
    return major, minor


def _options(arch: str, head_dim: int, extra_defines: dict[str, str] | None) -> list[bytes]:
    defines = {"AVO_HEAD_DIM": str(head_dim), **(extra_defines or {})}
    opts = [f"-arch={arch}", "-std=c++17", "--ptxas-options=-v", "--no-source-include",
            f"-I{INCLUDE_DIR}", f"-I{cuda_include_dir()}", *(f"-D{k}={v}" for k, v in defines.items())]
    return [o.encode() for o in opts]


def cache_key(source: str, arch: str, head_dim: int, extra_defines: dict | None = None) -> str:
    h = hashlib.sha256()
    for part in (source, arch, str(head_dim), repr(sorted((extra_defines or {}).items())),
                 *(p.read_text() for p in sorted(INCLUDE_DIR.rglob("*.cuh")))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _parse(log: str) -> dict:
    regs = _REGS.search(log)
    spill = _SPILL.search(log)
    return {
        "registers": int(regs[1]) if regs else None,
        "stack_bytes": int(spill[1]) if spill else None,
        "spill_bytes": int(spill[2]) + int(spill[3]) if spill else None,
    }


def _nvrtc(source: str, options: list[bytes]) -> tuple[bool, str, str, bytes]:
    """(ok, log, ptx, cubin) of one NVRTC run."""
    from cuda.bindings import nvrtc

    def get(size_fn, get_fn, prog) -> bytes:
        err, n = size_fn(prog)
        if int(err) or n == 0:
            return b""
        buf = b" " * n
        (err,) = get_fn(prog, buf)
        return b"" if int(err) else buf

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), SOURCE_NAME.encode(), 0, [], [])
    if int(err):
        raise RuntimeError(f"nvrtcCreateProgram failed: {err}")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        log = get(nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, prog).decode(errors="replace")
        log = log.replace("\x00", "")
        if int(err):
            return False, log, "", b""
        ptx = get(nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX, prog).decode(errors="replace").replace("\x00", "")
        return True, log, ptx, get(nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN, prog)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_source(source: str, arch: str, head_dim: int, cache_dir: str | os.PathLike | None = None,
                   extra_defines: dict[str, str] | None = None) -> Compiled:
    """Compile to PTX and a cubin; compile errors come back in `log`, never as exceptions."""
    key = cache_key(source, arch, head_dim, extra_defines)
    cache = Path(cache_dir) / key if cache_dir else None
    files = [cache.with_suffix(s) for s in (".cubin", ".ptx", ".log")] if cache else []
    if cache and all(f.exists() for f in files):
        cubin, ptx, log = files[0].read_bytes(), files[1].read_text(), files[2].read_text()
        cached = True
    else:
        ok, log, ptx, cubin = _nvrtc(source, _options(arch, head_dim, extra_defines))
        if not ok:  # the first diagnostic names the problem (a static_assert's rule, a typo's line)
            first = next((ln.strip() for ln in log.splitlines() if ": error" in ln), "")
            return Compiled(ok=False, log=log, error=f"compile error: {first[:300]}" if first else "compile error")
        cached = False
        if cache:
            from avo.fsutil import atomic_write_bytes

            for f, data in zip(files, (cubin, ptx.encode(), log.encode()), strict=True):
                atomic_write_bytes(f, data)
    res = _parse(log)
    try:
        launch = launch_from_cubin(cubin)
    except ContractError as e:
        return Compiled(ok=False, log=log, ptx=ptx, error=str(e), **res)
    return Compiled(ok=True, log=log, cubin=cubin, ptx=ptx, launch=launch, cached=cached, **res)


def compile_candidate(source: str, arch: str, head_dim: int, cache_dir=None, allow_printf: bool = False) -> Compiled:
    """The source gate, NVRTC, then the PTX gate; a rejection is a failed Compiled with the reason."""
    why = check_source(source, allow_printf=allow_printf)
    if why:
        return Compiled(ok=False, log="", error=f"rejected before compiling: {why}")
    c = compile_source(source, arch, head_dim, cache_dir)
    if c.ok:
        why = check_ptx(c.ptx, allow_printf=allow_printf)
        if why:
            c.ok, c.error, c.cubin = False, f"rejected after compiling: {why}", b""
    return c
