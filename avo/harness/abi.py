"""The host half of the kernel ABI in kernels_cuda/include/avo/attention.cuh, with no AVO imports.

The NVRTC compilation (one set of flags), AvoAttnParams packing, TMA descriptor encoding and the
launch of a loaded `avo_attention`. Self-contained (ctypes and cuda.bindings; torch tensors are
passed in), so `python -m avo.export` copies this file verbatim into the packages it writes, whose
op compiles and launches exactly as the harness does (avo.harness.nvrtc, avo.harness.launch).
Change it together with attention.cuh and AVO_ABI_VERSION.
"""
from __future__ import annotations

import ctypes
import math

ABI_VERSION = 1
ENTRY = "avo_attention"
LAUNCH_SYMBOL = "avo_launch"
_TMA_BYTES = 128
_PARAMS_ALIGN = 64  # alignas(64) of AvoTensorMap makes the whole struct 64-byte aligned


# every compilation of a kernel, in the harness and in an exported package: the contract's flags
NVRTC_FLAGS = ("-std=c++17", "--ptxas-options=-v", "--no-source-include")


def compile_options(arch: str, head_dim: int, include_dirs: list[str], defines: dict | None = None) -> list[str]:
    """NVRTC's options for one kernel: the target, the contract's flags, the headers and AVO_HEAD_DIM."""
    defines = {"AVO_HEAD_DIM": str(head_dim), **(defines or {})}
    return [f"-arch={arch}", *NVRTC_FLAGS, *(f"-I{d}" for d in include_dirs),
            *(f"-D{k}={v}" for k, v in defines.items())]


def cuda_include_dir() -> str:
    """The CUDA runtime headers NVRTC compiles against (cuda_bf16.h and friends)."""
    import cuda.pathfinder as pf

    return str(pf.find_nvidia_header_directory("cudart"))


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    if int(err):
        raise RuntimeError(f"NVRTC does not answer (nvrtcVersion: {err})")
    return major, minor


def nvrtc_compile(source: str, name: str, options: list[str]) -> tuple[bool, str, str, bytes]:
    """(ok, log, ptx, cubin) of one NVRTC run; a compile error is ok=False with NVRTC's log."""
    from cuda.bindings import nvrtc

    def get(size_fn, get_fn, prog) -> bytes:
        err, n = size_fn(prog)
        if int(err) or n == 0:
            return b""
        buf = b" " * n
        (err,) = get_fn(prog, buf)
        return b"" if int(err) else buf

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    if int(err):
        raise RuntimeError(f"nvrtcCreateProgram failed: {err}")
    try:
        opts = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = get(nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, prog).decode(errors="replace")
        log = log.replace("\x00", "")
        if int(err):
            return False, log, "", b""
        ptx = get(nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX, prog).decode(errors="replace").replace("\x00", "")
        return True, log, ptx, get(nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN, prog)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


class AvoTensorMap(ctypes.Structure):
    _fields_ = [("opaque", ctypes.c_ulonglong * 16)]


_FIELDS = [
    ("tma_q", AvoTensorMap), ("tma_k", AvoTensorMap), ("tma_v", AvoTensorMap), ("tma_o", AvoTensorMap),
    ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
    ("lse", ctypes.c_void_p),
    *[(f"{t}_{s}_stride", ctypes.c_longlong) for t in "qkvo" for s in ("batch", "row", "head")],
    ("lse_batch_stride", ctypes.c_longlong), ("lse_head_stride", ctypes.c_longlong),
    ("batch", ctypes.c_int), ("heads_q", ctypes.c_int), ("heads_kv", ctypes.c_int),
    ("seqlen_q", ctypes.c_int), ("seqlen_k", ctypes.c_int), ("head_dim", ctypes.c_int),
    ("softmax_scale", ctypes.c_float), ("softmax_scale_log2", ctypes.c_float),
    ("causal", ctypes.c_int), ("num_sms", ctypes.c_int),
    ("tile_counter", ctypes.c_void_p),
]
# names in declaration order, for the layout test
FIELD_NAMES = [name for name, _ in _FIELDS]


def _padded_fields() -> list:
    class _Raw(ctypes.Structure):
        _fields_ = _FIELDS
    pad = -ctypes.sizeof(_Raw) % _PARAMS_ALIGN
    return _FIELDS + ([("_pad", ctypes.c_ubyte * pad)] if pad else [])


class AvoAttnParams(ctypes.Structure):
    _fields_ = _padded_fields()


def check(result):
    """cuda.bindings returns (err, *values); raise on any error, return the values."""
    err, *rest = result
    if int(err) != 0:
        from cuda.bindings import driver as drv

        _, name = drv.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver error {name.decode() if name else int(err)}")
    return rest[0] if len(rest) == 1 else tuple(rest)


# Encoded descriptors by (address, dtype, shape, strides, rows): a descriptor is a pure function of
# these, and encoding four through the Python bindings costs tens of microseconds per launch.
_TMA_CACHE: dict[tuple, bytes] = {}
_TMA_CACHE_SIZE = 256


def encode_tma(t, rows: int) -> bytes:
    """4-D tiled map over (D, S, H, B) of a (B, S, H, D) BF16 tensor, as CONTRACT.md specifies."""
    key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), rows)
    desc = _TMA_CACHE.get(key)
    if desc is None:
        desc = _encode_tma(t, rows)
        if len(_TMA_CACHE) >= _TMA_CACHE_SIZE:
            _TMA_CACHE.clear()
        _TMA_CACHE[key] = desc
    return desc


def _encode_tma(t, rows: int) -> bytes:
    from cuda.bindings import driver as drv

    b, s, h, d = t.shape
    es = t.element_size()
    if t.stride(3) != 1:
        raise ValueError("TMA needs a contiguous last dimension")
    tm = check(drv.cuTensorMapEncodeTiled(
        drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, t.data_ptr(),
        # cuda.bindings wants its own integer types here (plain ints are refused by some releases)
        [drv.cuuint64_t(x) for x in (d, s, h, b)],
        [drv.cuuint64_t(x * es) for x in (t.stride(1), t.stride(2), t.stride(0))],
        [drv.cuuint32_t(x) for x in (64, rows, 1, 1)], [drv.cuuint32_t(1)] * 4,
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))
    return ctypes.string_at(tm.getPtr(), _TMA_BYTES)


def pack_params(q, k, v, o, lse, causal: bool, num_sms: int, tile_counter, launch,
                softmax_scale: float | None = None) -> AvoAttnParams:
    """Fill AvoAttnParams for (B, S, H, D) q/k/v/o and (B, Hq, Sq) lse tensors.

    launch: the LaunchGeometry (anything with tma_rows_q and tma_rows_kv).
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    p = AvoAttnParams()
    for name, t in (("q", q), ("k", k), ("v", v), ("o", o)):
        setattr(p, name, t.data_ptr())
        setattr(p, f"{name}_batch_stride", t.stride(0))
        setattr(p, f"{name}_row_stride", t.stride(1))
        setattr(p, f"{name}_head_stride", t.stride(2))
    p.lse, p.lse_batch_stride, p.lse_head_stride = lse.data_ptr(), lse.stride(0), lse.stride(1)
    p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim = b, hq, hkv, sq, sk, d
    p.softmax_scale, p.softmax_scale_log2 = scale, scale * math.log2(math.e)
    p.causal, p.num_sms, p.tile_counter = int(causal), num_sms, tile_counter.data_ptr()
    if launch.tma_rows_q > 0:
        for name, t, rows in (("tma_q", q, launch.tma_rows_q), ("tma_k", k, launch.tma_rows_kv),
                              ("tma_v", v, launch.tma_rows_kv), ("tma_o", o, launch.tma_rows_q)):
            ctypes.memmove(ctypes.addressof(getattr(p, name)), encode_tma(t, rows), _TMA_BYTES)
    return p


class LaunchGeometry:
    """`avo_launch` (threads, smem, block_m, persistent, tma_rows_q, tma_rows_kv, cluster, abi) as ints."""
    NAMES = ("threads", "smem", "block_m", "persistent", "tma_rows_q", "tma_rows_kv", "cluster", "abi")

    def __init__(self, values):
        values = [int(x) for x in values]
        if len(values) != 8:
            raise ValueError(f"{LAUNCH_SYMBOL} must hold 8 ints, got {len(values)}")
        for name, x in zip(self.NAMES, values, strict=True):
            setattr(self, name, x)
        if self.abi != ABI_VERSION:
            raise ValueError(f"kernel written for ABI {self.abi}, this host code speaks {ABI_VERSION}")
        if self.cluster != 1:
            raise ValueError(f"cluster={self.cluster}: only cluster size 1 is supported")
        if not (32 <= self.threads <= 1024 and self.threads % 32 == 0):
            raise ValueError(f"threads={self.threads}: need a multiple of 32 in [32, 1024]")
        if not (0 <= self.smem <= 227 * 1024):
            raise ValueError(f"smem={self.smem} bytes: Hopper allows at most 232448 per block")
        if self.block_m <= 0:
            raise ValueError(f"block_m={self.block_m} must be positive")
        if self.persistent < 0 or self.tma_rows_q < 0 or self.tma_rows_kv < 0:
            raise ValueError("persistent and tma rows must be >= 0")
        if (self.tma_rows_q > 0) != (self.tma_rows_kv > 0) or max(self.tma_rows_q, self.tma_rows_kv) > 256:
            raise ValueError("tma rows: both zero, or both in [1, 256]")

    def __repr__(self) -> str:
        return "LaunchGeometry(" + ", ".join(f"{n}={getattr(self, n)}" for n in self.NAMES) + ")"

    def grid(self, batch: int, heads_q: int, seqlen_q: int, num_sms: int) -> tuple[int, int, int]:
        return launch_grid(self.persistent, self.block_m, batch, heads_q, seqlen_q, num_sms)


def arch_name(major: int, minor: int) -> str:
    """NVRTC's target for a compute capability: Hopper and newer get their architecture-specific
    features (wgmma, setmaxnreg) with the 'a' suffix."""
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


def launch_grid(persistent: int, block_m: int, batch: int, heads_q: int, seqlen_q: int,
                num_sms: int) -> tuple[int, int, int]:
    """The contract's grid: `persistent` blocks per SM, or one block per (query tile, head, batch)."""
    if persistent:
        return (num_sms * persistent, 1, 1)
    return (math.ceil(seqlen_q / block_m), heads_q, batch)


class LoadedKernel:
    """`avo_attention` of one cubin, loaded into the current context (torch's, for its device).

    The geometry is read from the loaded module's `avo_launch`, not trusted from elsewhere.
    """

    def __init__(self, cubin: bytes, num_sms: int):
        from cuda.bindings import driver as drv

        self.drv, self.num_sms = drv, num_sms
        self.module = check(drv.cuModuleLoadData(cubin))
        self.func = check(drv.cuModuleGetFunction(self.module, ENTRY.encode()))
        ptr, size = check(drv.cuModuleGetGlobal(self.module, LAUNCH_SYMBOL.encode()))
        if size != 32:
            raise ValueError(f"`{LAUNCH_SYMBOL}` is {size} bytes; the contract says int[8]")
        buf = (ctypes.c_int * 8)()
        check(drv.cuMemcpyDtoH(ctypes.addressof(buf), ptr, 32))
        self.spec = LaunchGeometry(list(buf))
        if self.spec.smem > 48 * 1024:
            check(drv.cuFuncSetAttribute(
                self.func, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.spec.smem))

    def launch(self, stream_handle: int, q, k, v, o, lse, causal: bool, tile_counter,
               softmax_scale: float | None = None) -> None:
        """Asynchronous on the given CUstream handle; tile_counter must already be zero on that stream."""
        p = pack_params(q, k, v, o, lse, causal, self.num_sms, tile_counter, self.spec, softmax_scale)
        argv = (ctypes.c_void_p * 1)(ctypes.addressof(p))
        gx, gy, gz = self.spec.grid(q.shape[0], q.shape[2], q.shape[1], self.num_sms)
        check(self.drv.cuLaunchKernel(self.func, gx, gy, gz, self.spec.threads, 1, 1, self.spec.smem,
                                      self.drv.CUstream(stream_handle), ctypes.addressof(argv), 0))
        # the driver copies the parameter buffer at launch; p and argv may go now
