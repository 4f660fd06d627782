"""NVRTC compilation: source -> PTX + cubin + ptxas resource report, behind the two gates.

One NVRTC run for a real architecture (sm_90a) yields both the PTX, which the PTX gate judges,
and the cubin built from exactly that PTX. The options and the NVRTC call are the ABI module's
(avo.harness.abi), which exported packages copy, so the harness and an exported op compile one
way. Runs inside the worker process (generated code never compiles in the search process),
whose compile phase has its own time limit and whose host memory the parent watches.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from avo.contract import launch_from_cubin
from avo.errors import ContractError
from avo.harness.abi import LaunchGeometry, compile_options, cuda_include_dir, nvrtc_compile
from avo.harness.abi import nvrtc_version as _nvrtc_version
from avo.harness.ptxgate import check_ptx
from avo.harness.static import check_source
from avo.paths import INCLUDE_DIR

SOURCE_NAME = "candidate.cu"  # what diagnostics call the candidate (never a path on this machine)

_REGS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_CUMULATIVE = re.compile(r"(\d+) bytes cumulative stack size")
_DYNAMIC = "cannot be statically determined"  # ptxas: recursion or alloca


@dataclass
class Compiled:
    ok: bool
    log: str
    cubin: bytes = b""
    ptx: str = ""
    launch: LaunchGeometry | None = None
    registers: int | None = None
    stack_bytes: int | None = None  # local memory per thread: the deepest stack ptxas reports
    spill_bytes: int | None = None  # stores + loads, as ptxas reports
    dynamic_stack: bool = False     # ptxas cannot bound the stack (recursion, alloca)
    cached: bool = False
    error: str = ""


def nvrtc_version() -> tuple[int, int]:
    """Loads NVRTC; raises RuntimeError with one line where it is missing (a broken environment)."""
    try:
        return _nvrtc_version()
    except Exception as e:  # noqa: BLE001 - any failure to load the library means the same thing
        raise RuntimeError(f"NVRTC cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                           "install cuda-bindings with the NVRTC wheels (pip install -e '.[nvrtc]')") from None


def compiler() -> str:
    """What builds the cubins here, as the lineage records it (extra.compiler)."""
    major, minor = nvrtc_version()
    return f"nvrtc {major}.{minor}"


# On a machine with a driver, NVRTC answers a PTX the driver's compute cache has seen (an earlier compile
# of the same candidate, even in another process) with that cubin and an empty log: no ptxas report, so
# no stack bound, registers or spills, and a compile time that is a cache read. The harness always compiles.
HARNESS_FLAGS = ("--no-cache",)


def _options(arch: str, head_dim: int, extra_defines: dict[str, str] | None) -> list[str]:
    return [*compile_options(arch, head_dim, [str(INCLUDE_DIR), cuda_include_dir()], extra_defines), *HARNESS_FLAGS]


def cache_key(source: str, options: list[str]) -> str:
    h = hashlib.sha256()
    for part in (source, compiler(), *options,
                 *(p.read_text() for p in sorted(INCLUDE_DIR.rglob("*.cuh")))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def resources(log: str) -> dict:
    """Registers, local memory per thread and spills from ptxas's report (-v) in NVRTC's log.

    The stack is the largest of ptxas's cumulative stack size and the sum of every function's frame
    (a bound when functions are not inlined); a stack ptxas cannot bound is flagged."""
    regs = _REGS.search(log)
    frames = [tuple(int(x) for x in m) for m in _FRAME.findall(log)]
    cumulative = [int(x) for x in _CUMULATIVE.findall(log)]
    return {
        "registers": int(regs[1]) if regs else None,
        "stack_bytes": max([sum(f[0] for f in frames), *cumulative]) if frames or cumulative else None,
        "spill_bytes": sum(f[1] + f[2] for f in frames) if frames else None,
        "dynamic_stack": _DYNAMIC in log,
    }


def compile_source(source: str, arch: str, head_dim: int, cache_dir: str | os.PathLike | None = None,
                   extra_defines: dict[str, str] | None = None) -> Compiled:
    """Compile to PTX and a cubin; compile errors come back in `log`, never as exceptions."""
    options = _options(arch, head_dim, extra_defines)
    cache = Path(cache_dir) / cache_key(source, options) if cache_dir else None
    files = [cache.with_suffix(s) for s in (".cubin", ".ptx", ".log")] if cache else []
    if cache and all(f.exists() for f in files):
        cubin, ptx, log = files[0].read_bytes(), files[1].read_text(), files[2].read_text()
        cached = True
    else:
        ok, log, ptx, cubin = nvrtc_compile(source, SOURCE_NAME, options)
        if not ok:  # the first diagnostic names the problem (a static_assert's rule, a typo's line)
            first = next((ln.strip() for ln in log.splitlines() if ": error" in ln), "")
            return Compiled(ok=False, log=log, error=f"compile error: {first[:300]}" if first else "compile error")
        cached = False
        if cache:
            from avo.fsutil import atomic_write_bytes

            for f, data in zip(files, (cubin, ptx.encode(), log.encode()), strict=True):
                atomic_write_bytes(f, data)
    res = resources(log)
    try:
        launch = launch_from_cubin(cubin)
    except ContractError as e:
        return Compiled(ok=False, log=log, ptx=ptx, error=str(e), **res)
    return Compiled(ok=True, log=log, cubin=cubin, ptx=ptx, launch=launch, cached=cached, **res)


def local_memory_error(stack_bytes: int | None, dynamic: bool, limit: int) -> str | None:
    """Why a kernel's local memory per thread is refused (harness.max_local_bytes), or None.

    The driver reserves local memory for every thread that can be resident at once: 1 KB per
    thread is about 280 MB on an H100, 400 KB over 100 GB, which starves every other process."""
    if dynamic:
        return ("its stack size cannot be bounded when it is compiled (recursion or alloca); local memory "
                "per thread must be known")
    if stack_bytes is not None and stack_bytes > limit:
        return (f"uses {stack_bytes} bytes of local memory per thread (stack frame and spills), over "
                f"harness.max_local_bytes={limit}: keep arrays in registers or shared memory")
    return None


def compile_candidate(source: str, arch: str, head_dim: int, cache_dir=None, allow_printf: bool = False,
                      max_local_bytes: int | None = None) -> Compiled:
    """The source gate, NVRTC, the PTX gate and the local-memory bound; a rejection is a failed Compiled
    with the reason."""
    why = check_source(source, allow_printf=allow_printf)
    if why:
        return Compiled(ok=False, log="", error=f"rejected before compiling: {why}")
    c = compile_source(source, arch, head_dim, cache_dir)
    if c.ok:
        why = check_ptx(c.ptx, allow_printf=allow_printf)
        if why is None and c.registers is None:  # the stack bound below needs it
            why = "NVRTC returned no ptxas resource report (--ptxas-options=-v), so its local memory cannot be bounded"
        if why is None and max_local_bytes is not None:
            why = local_memory_error(c.stack_bytes, c.dynamic_stack, max_local_bytes)
            why = f"the kernel {why}" if why else None
        if why:
            c.ok, c.error, c.cubin = False, f"rejected after compiling: {why}", b""
    return c
