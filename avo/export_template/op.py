"""Forward attention with a kernel discovered by AVO, as a PyTorch op.

    out = attention(q, k, v, causal=False, scale=None)
    out, lse = attention_with_lse(q, k, v, causal=False, scale=None)

q: (B, Sq, Hq, D), k and v: (B, Sk, Hkv, D), all bfloat16 on one CUDA device with a contiguous
last dimension; Hkv must divide Hq (grouped-query attention). out: (B, Sq, Hq, D) bfloat16;
lse: (B, Hq, Sq) float32, the natural log of each row's softmax denominator. Causal masking is
bottom-right aligned (key j is visible to query i iff j <= i + Sk - Sq), as in FlashAttention.

The kernel is compiled with NVRTC on first use, once per (head dim, GPU architecture), with the
search harness's own options and code (the ABI module, _abi.py), and the cubin is cached on disk
under $AVO_EXPORT_CACHE (default ~/.cache/avo_export) by a hash of the source, the header, the
options and the NVRTC version. Launches go on torch's current stream. The op accepts what the
search verified (avo_export.json's "envelope": head dims, GQA groups, sequence lengths up to the
longest the checks ran, element offsets below 2^32) and refuses the rest with UnsupportedError.
The op is a torch.library custom op with a fake implementation, so torch.compile traces it.
Needs torch and cuda-python (cuda-bindings with NVRTC) only.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path

import torch

from . import _abi

HERE = Path(__file__).resolve().parent
META = json.loads((HERE / "avo_export.json").read_text())
SOURCE = (HERE / META["source_file"]).read_text()
INCLUDE = HERE / "include"
OP_NAME = f"avo_export::attention_{META['source_sha256'][:16]}"


class UnsupportedError(ValueError):
    """The inputs are valid attention inputs, but not ones this kernel was built and checked for."""


def metadata() -> dict:
    """What was exported: source run and version, launch geometry, supported configurations, scores."""
    return json.loads(json.dumps(META))


# -- input checks (shared by the real and the fake implementation) ---------------------------------
def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: bool = True) -> None:
    """real=False under fake tensors (torch.compile tracing), which have no data pointer."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype != torch.bfloat16:
            raise TypeError(f"{name} is {t.dtype}; this kernel computes in bfloat16 (use .to(torch.bfloat16))")
        if t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}; the kernel runs on CUDA devices only")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} has stride {t.stride(-1)} in its last dimension; it must be 1 "
                             "(call .contiguous())")
        if any(s % 8 for s in t.stride()[:3]) or (real and t.data_ptr() % 16):
            raise ValueError(f"{name} must be 16-byte aligned with strides that are multiples of 8 elements "
                             f"(strides {tuple(t.stride())}); call .contiguous()")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, sq, hq, d), (bk, sk, hkv, dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if min(b, sq, sk, hq, hkv) < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hq % hkv:
        raise ValueError(f"{hkv} KV heads do not divide {hq} query heads (grouped-query attention needs "
                         "heads_q % heads_kv == 0)")
    if d not in META["head_dims"]:
        raise UnsupportedError(f"head_dim={d}: this kernel was exported for head dims {META['head_dims']} "
                               "(export again with --head-dims to compile others)")
    if hq // hkv not in META["groups"]:
        raise UnsupportedError(f"group {hq // hkv} (Hq={hq}, Hkv={hkv}): this kernel was verified for groups "
                               f"{META['groups']} only; seed a search for that group from its run and export "
                               "that run's best version")
    envelope = META["envelope"]
    if max(sq, sk) > envelope["max_seqlen"]:
        raise UnsupportedError(f"sequence length {max(sq, sk)}: this kernel was verified on rows of up to "
                               f"{envelope['max_seqlen']} (the longest its checks ran)")
    reach = max([q.numel(), *(sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) for t in (q, k, v))])
    if reach >= envelope["max_offset"]:
        raise UnsupportedError(f"a tensor reaches {reach} elements from its start: this kernel was verified for "
                               f"offsets below {envelope['max_offset']}")


# -- compilation and loading ----------------------------------------------------------------------
_lock = threading.Lock()
_loaded: dict[tuple[int, int], _abi.LoadedKernel] = {}


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < tuple(META["min_capability"]):
        raise UnsupportedError(f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; this kernel needs "
                               f"sm_{META['min_capability'][0]}{META['min_capability'][1]} or newer")
    return _abi.arch_name(major, minor)


def _compile(head_dim: int, arch: str) -> bytes:
    """The cubin for one head dim, compiled exactly as the search's harness compiles (_abi)."""
    header = (INCLUDE / "avo" / "attention.cuh").read_text()
    opts = _abi.compile_options(arch, head_dim, [str(INCLUDE), _abi.cuda_include_dir()])
    key_parts = [SOURCE, header, *(o for o in opts if not o.startswith("-I")), repr(_abi.nvrtc_version())]
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()
    cache = Path(os.environ.get("AVO_EXPORT_CACHE", "~/.cache/avo_export")).expanduser() / f"{key}.cubin"
    if cache.exists():
        return cache.read_bytes()
    ok, log, _, cubin = _abi.nvrtc_compile(SOURCE, META["source_file"], opts)
    if not ok:
        raise RuntimeError(f"NVRTC could not compile {META['source_file']} for {arch}, head_dim={head_dim}:\n"
                           + log[-4000:])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cubin)
    os.replace(tmp, cache)  # atomic: concurrent processes never read half a cubin
    return cubin


def _kernel(device: torch.device, head_dim: int) -> _abi.LoadedKernel:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        kern = _loaded.get((index, head_dim))
        if kern is None:
            with torch.cuda.device(index):
                torch.cuda.current_stream(index)  # torch's primary context is current on this thread
                cubin = _compile(head_dim, _arch(device))
                num_sms = torch.cuda.get_device_properties(index).multi_processor_count
                kern = _loaded[(index, head_dim)] = _abi.LoadedKernel(cubin, num_sms)
        return kern


def prepare(head_dim: int | None = None, device: torch.device | int | str | None = None) -> None:
    """Compile and load ahead of time (otherwise the first call does it)."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    for d in [head_dim] if head_dim else META["head_dims"]:
        _kernel(device, d)


# -- the op ---------------------------------------------------------------------------------------
@torch.library.custom_op(OP_NAME, mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(q, k, v)
    b, sq, hq, d = q.shape
    kern = _kernel(q.device, d)
    with torch.cuda.device(q.device):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        tile_counter = torch.zeros(1, dtype=torch.int32, device=q.device)  # per call: safe on any stream
        stream = torch.cuda.current_stream(q.device).cuda_stream
        kern.launch(stream, q, k, v, out, lse, causal, tile_counter, scale)
    return out, lse


@_attention.register_fake
def _(q, k, v, causal, scale):
    _validate(q, k, v, real=False)
    b, sq, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, hq, sq), dtype=torch.float32)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse); scale defaults to 1/sqrt(head_dim). Not differentiable (forward kernel only)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (batch, seqlen, heads, head_dim), got {getattr(q, 'shape', q)!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive finite number")
    return _attention(q, k, v, bool(causal), float(scale))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """The attention output (B, Sq, Hq, D); see attention_with_lse for the log-sum-exp too."""
    return attention_with_lse(q, k, v, causal, scale)[0]


__all__ = ["attention", "attention_with_lse", "metadata", "prepare", "UnsupportedError"]
