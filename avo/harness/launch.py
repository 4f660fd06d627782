"""Host side of the kernel ABI for the harness: module load and launch (packing is in abi.py).

The ctypes layout (abi.py) mirrors kernels_cuda/include/avo/attention.cuh field by field; a CPU test
compiles a probe kernel and compares every offsetof/sizeof with that struct.
Worker-side only (imports torch and the CUDA driver bindings).
"""
from __future__ import annotations

import ctypes

# the self-contained half of the ABI lives in abi.py, which `avo.export` copies into exported packages
from avo.contract import ENTRY, LaunchSpec
from avo.harness.abi import FIELD_NAMES, AvoAttnParams, AvoTensorMap, encode_tma, pack_params  # noqa: F401
from avo.harness.abi import check as _check

COUNTER_GUARD = 1024           # int32 elements of guard band on each side of the tile counter
COUNTER_SENTINEL = 0x5A5A5A5A


class Kernel:
    """One loaded cubin's `avo_attention`, launched on the caller's (torch) stream."""

    def __init__(self, cubin: bytes, launch: LaunchSpec, device: int = 0):
        import torch
        from cuda.bindings import driver as drv

        self.torch, self.drv, self.spec = torch, drv, launch
        torch.cuda.set_device(device)
        torch.empty(1, device="cuda")  # makes torch's primary context current on this thread
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._module = _check(drv.cuModuleLoadData(cubin))
        self.func = _check(drv.cuModuleGetFunction(self._module, ENTRY.encode()))
        if launch.smem > 48 * 1024:
            _check(drv.cuFuncSetAttribute(
                self.func, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, launch.smem))
        # the counter sits inside a guard band of a known pattern: a kernel that keeps state next to
        # it (the only memory it owns besides its outputs) is caught like a stray output write
        self._counter = torch.full((2 * COUNTER_GUARD + 1,), COUNTER_SENTINEL, dtype=torch.int32, device="cuda")
        self.tile_counter = self._counter[COUNTER_GUARD:COUNTER_GUARD + 1]

    def guards_broken(self):
        """A GPU boolean: was anything beside the tile counter written? (no host synchronisation)"""
        g = self._counter
        return (g[:COUNTER_GUARD] != COUNTER_SENTINEL).any() | (g[COUNTER_GUARD + 1:] != COUNTER_SENTINEL).any()

    def attribute(self, name: str) -> int:
        """A CU_FUNC_ATTRIBUTE_* of the loaded function, e.g. "NUM_REGS", "LOCAL_SIZE_BYTES"."""
        attr = getattr(self.drv.CUfunction_attribute, f"CU_FUNC_ATTRIBUTE_{name}")
        return int(_check(self.drv.cuFuncGetAttribute(attr, self.func)))

    def __call__(self, q, k, v, o, lse, causal: bool, softmax_scale: float | None = None) -> None:
        """Zero the tile counter and launch, both on the current torch stream (asynchronous)."""
        stream = self.torch.cuda.current_stream()
        self.tile_counter.zero_()
        p = pack_params(q, k, v, o, lse, causal, self.num_sms, self.tile_counter, self.spec, softmax_scale)
        argv = (ctypes.c_void_p * 1)(ctypes.addressof(p))
        gx, gy, gz = self.spec.grid(q.shape[0], q.shape[2], q.shape[1], self.num_sms)
        _check(self.drv.cuLaunchKernel(self.func, gx, gy, gz, self.spec.threads, 1, 1, self.spec.smem,
                                       self.drv.CUstream(stream.cuda_stream), ctypes.addressof(argv), 0))
        # the driver copies the parameter buffer at launch; p and argv may go now
