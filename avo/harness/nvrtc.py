"""NVRTC compilation through cuda.core: source -> cubin + ptxas resource report.

Runs inside the worker process (generated code never compiles in the search process).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from avo.contract import ContractError, LaunchSpec

INCLUDE_DIR = Path(__file__).resolve().parents[2] / "kernels_cuda" / "include"

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Compiled:
    ok: bool
    log: str
    cubin: bytes = b""
    launch: LaunchSpec | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    spill_bytes: int | None = None  # stores + loads, as ptxas reports
    key: str = ""
    cached: bool = False
    error: str = ""
    resources: dict = field(default_factory=dict)


def cuda_include_dir() -> str:
    import cuda.pathfinder as pf

    return str(pf.find_nvidia_header_directory("cudart"))


def _options(arch: str, head_dim: int, extra_defines: dict[str, str] | None):
    from cuda.core import ProgramOptions

    defines = {"AVO_HEAD_DIM": str(head_dim), **(extra_defines or {})}
    return ProgramOptions(arch=arch, std="c++17", ptxas_options=["-v"],
                          include_path=[str(INCLUDE_DIR), cuda_include_dir()],
                          define_macro=[(k, v) for k, v in defines.items()])


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


def compile_source(source: str, arch: str, head_dim: int, cache_dir: str | os.PathLike | None = None,
                   extra_defines: dict[str, str] | None = None) -> Compiled:
    """Compile to a cubin; compile errors come back in `log`, never as exceptions."""
    from cuda.core import Program
    from cuda.core._utils.cuda_utils import NVRTCError

    key = cache_key(source, arch, head_dim, extra_defines)
    cache = Path(cache_dir) / f"{key}.cubin" if cache_dir else None
    log_path = cache.with_suffix(".log") if cache else None
    if cache and cache.exists() and log_path.exists():
        cubin, log = cache.read_bytes(), log_path.read_text()
        cached = True
    else:
        buf = io.StringIO()
        try:
            obj = Program(source, "c++", options=_options(arch, head_dim, extra_defines)).compile("cubin", logs=buf)
        except NVRTCError as e:
            # the error text already carries NVRTC's compilation log
            return Compiled(ok=False, log=str(e), key=key, error="compile error")
        cubin, log, cached = obj.code, buf.getvalue().replace("\x00", ""), False
        if cache:
            from avo.fsutil import atomic_write_bytes

            atomic_write_bytes(cache, cubin)
            atomic_write_bytes(log_path, log.encode())
    res = _parse(log)
    try:
        launch = LaunchSpec.from_cubin(cubin)
    except ContractError as e:
        return Compiled(ok=False, log=log, key=key, error=str(e), resources=res, **res)
    return Compiled(ok=True, log=log, cubin=cubin, launch=launch, key=key, cached=cached, resources=res, **res)
