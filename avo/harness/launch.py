"""The harness's launcher: the ABI's loaded kernel (abi.LoadedKernel) on torch's current stream,
with the tile counter inside guard bands and the module's memory watched. Worker-side only
(imports torch and the CUDA driver).

Packing, tensor maps and the launch itself live once, in abi.py (the file exports copy); a CPU
test compiles a probe kernel and compares every offsetof/sizeof with attention.cuh's struct.
"""
from __future__ import annotations

import ctypes
import io

from avo.harness.abi import LoadedKernel, check

COUNTER_GUARD = 1024           # int32 elements of guard band on each side of the tile counter
COUNTER_SENTINEL = 0x5A5A5A5A


def module_objects(cubin: bytes) -> list[str]:
    """The variables of a cubin's module memory: `.nv.global*` (avo_launch, and in the correctness mode
    printf's strings) and the user constant banks `.nv.constant<N>` (N > 0: bank 0 holds the parameters)."""
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(cubin))
    symtab = elf.get_section_by_name(".symtab")
    names = []
    for sym in symtab.iter_symbols() if symtab else []:
        if sym["st_info"]["type"] != "STT_OBJECT" or not isinstance(sym["st_shndx"], int) or not sym["st_size"]:
            continue
        section = elf.get_section(sym["st_shndx"]).name
        if section.startswith(".nv.global") or (section.startswith(".nv.constant") and
                                                not section.startswith(".nv.constant0")):
            names.append(sym.name)
    return names


class Kernel:
    """One cubin's `avo_attention`, loaded into torch's context and launched on torch's current stream."""

    def __init__(self, cubin: bytes, device: int = 0):
        import torch

        self.torch = torch
        torch.cuda.set_device(device)
        torch.empty(1, device="cuda")  # makes torch's primary context current on this thread
        self.loaded = LoadedKernel(cubin, torch.cuda.get_device_properties(device).multi_processor_count)
        self.spec = self.loaded.spec
        # the counter sits inside a guard band of a known pattern: a kernel that keeps state next to
        # it (the only memory it owns besides its outputs) is caught like a stray output write
        self._counter = torch.full((2 * COUNTER_GUARD + 1,), COUNTER_SENTINEL, dtype=torch.int32, device="cuda")
        self.tile_counter = self._counter[COUNTER_GUARD:COUNTER_GUARD + 1]
        # module memory as loaded, before any launch: the PTX gate lets a kernel only read it, and
        # this catches a write no text shows (a pointer formed from an integer)
        self._memory = {name: data for name in module_objects(cubin) if (data := self._read(name)) is not None}

    def _read(self, name: str) -> bytes | None:
        drv = self.loaded.drv
        try:
            ptr, size = check(drv.cuModuleGetGlobal(self.loaded.module, name.encode()))
        except RuntimeError:
            if name.startswith(("$str", "__unnamed_")):
                return None  # printf's strings, which only the untimed correctness mode allows
            raise
        buf = (ctypes.c_ubyte * size)()
        check(drv.cuMemcpyDtoH(ctypes.addressof(buf), ptr, size))
        return bytes(buf)

    def module_changed(self) -> str | None:
        """The first module variable whose bytes differ from the loaded ones (synchronises), or None."""
        self.torch.cuda.synchronize()
        return next((name for name, data in self._memory.items() if self._read(name) != data), None)

    def guards_broken(self):
        """A GPU boolean: was anything beside the tile counter written? (no host synchronisation)"""
        g = self._counter
        return (g[:COUNTER_GUARD] != COUNTER_SENTINEL).any() | (g[COUNTER_GUARD + 1:] != COUNTER_SENTINEL).any()

    def attribute(self, name: str) -> int:
        """A CU_FUNC_ATTRIBUTE_* of the loaded function, e.g. "NUM_REGS", "LOCAL_SIZE_BYTES"."""
        drv = self.loaded.drv
        return int(check(drv.cuFuncGetAttribute(getattr(drv.CUfunction_attribute, f"CU_FUNC_ATTRIBUTE_{name}"),
                                                self.loaded.func)))

    def __call__(self, q, k, v, o, lse, causal: bool, softmax_scale: float | None = None) -> None:
        """Zero the tile counter and launch, both on the current torch stream (asynchronous)."""
        self.tile_counter.zero_()
        self.loaded.launch(self.torch.cuda.current_stream().cuda_stream, q, k, v, o, lse, causal, self.tile_counter,
                           softmax_scale)
