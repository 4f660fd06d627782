"""Exported packages on the GPU: outputs against PyTorch, torch.compile, streams, and errors."""
from __future__ import annotations

import importlib
import math
import sys

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.gpu

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim); odd lengths on purpose
CASES = [(2, 1, 1, 4, 4, 128), (2, 17, 17, 4, 4, 128), (1, 1000, 1000, 8, 2, 128), (2, 300, 128, 8, 8, 128),
         (1, 128, 300, 8, 1, 128), (1, 4097, 4097, 4, 4, 128), (2, 333, 333, 8, 2, 64)]
KERNELS = {"naive": ([64, 128], [1, 4, 8]), "sm90": ([128], [1, 4, 8])}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from avo.export import export

    root = tmp_path_factory.mktemp("exported")
    out = {}
    for name, (dims, groups) in KERNELS.items():
        if name == "sm90" and torch.cuda.get_device_capability() < (9, 0):
            continue
        export(name, root / f"avo_{name}", head_dims=dims, groups=groups)
    sys.path.insert(0, str(root))
    for name in KERNELS:
        if (root / f"avo_{name}").exists():
            out[name] = importlib.import_module(f"avo_{name}")
    yield out
    sys.path.remove(str(root))


def _inputs(b, sq, sk, hq, hkv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, sq, hq, d, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(b, sk, hkv, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    return q, k, v


def _sdpa(q, k, v, causal, scale, dtype):
    """SDPA in `dtype`; masks bottom-right like FlashAttention; fully masked rows give 0."""
    sq, sk = q.shape[1], k.shape[1]
    mask = None
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        mask = torch.arange(sk, device=q.device)[None, :] <= i + sk - sq
    o = F.scaled_dot_product_attention(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)), attn_mask=mask,
                                       scale=scale, enable_gqa=True)
    return o.transpose(1, 2).nan_to_num(0.0)


def _lse(q, k, causal, scale):
    hq, hkv, sq, sk = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    kf = k.float().repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(sk, device=q.device)[None, :] > i + sk - sq, float("-inf"))
    return torch.logsumexp(s, dim=-1)


def _assert_close(out, lse, q, k, v, causal, scale):
    ref = _sdpa(q, k, v, causal, scale, torch.float32)
    bf16_err = (_sdpa(q, k, v, causal, scale, torch.bfloat16).float() - ref).abs().max().item()
    err = (out.float() - ref).abs().max().item()
    assert err <= 2 * bf16_err + 1e-3, f"max error {err:.3e} vs SDPA-bf16's {bf16_err:.3e}"
    ref_lse = _lse(q, k, causal, scale)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    if fin.any():
        assert (lse[fin] - ref_lse[fin]).abs().max().item() < 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_s{}x{}_h{}-{}_d{}".format(*c))
@pytest.mark.parametrize("name", list(KERNELS))
def test_matches_sdpa(packages, name, case, causal):
    if name not in packages:
        pytest.skip(f"{name} needs a newer GPU")
    pkg = packages[name]
    if case[5] not in pkg.metadata()["head_dims"]:
        pytest.skip(f"{name} exported without head_dim={case[5]}")
    q, k, v = _inputs(*case)
    out, lse = pkg.attention_with_lse(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.shape == (case[0], case[3], case[1])
    _assert_close(out, lse, q, k, v, causal, 1 / math.sqrt(case[5]))
    assert torch.equal(pkg.attention(q, k, v, causal=causal), out)  # deterministic, same op


@pytest.mark.parametrize("name", list(KERNELS))
def test_custom_scale_and_strided_inputs(packages, name):
    if name not in packages:
        pytest.skip(f"{name} needs a newer GPU")
    pkg = packages[name]
    # q, k, v as views of one packed (B, S, 3, H, D) tensor: strided rows, contiguous last dim
    qkv = torch.randn(2, 257, 3, 8, 128, device="cuda").bfloat16()
    q, k, v = qkv.unbind(2)
    out, lse = pkg.attention_with_lse(q, k, v, causal=True, scale=0.05)
    _assert_close(out, lse, q, k, v, True, 0.05)


@pytest.mark.parametrize("name", list(KERNELS))
def test_torch_compile_and_opcheck(packages, name):
    if name not in packages:
        pytest.skip(f"{name} needs a newer GPU")
    pkg = packages[name]
    q, k, v = _inputs(2, 200, 200, 8, 2, 128, seed=3)

    def f(q, k, v):
        return pkg.attention(q, k, v, causal=True).float().sum(-1) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    torch.library.opcheck(pkg._attention, (q, k, v, True, 0.088),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_runs_on_the_current_stream(packages):
    """On a side stream busy sleeping, the op must see what that stream wrote before it."""
    pkg = packages["naive"]
    q, k, v = _inputs(1, 2048, 2048, 8, 8, 128, seed=5)
    q_new = torch.randn_like(q)
    expected_old, expected_new = pkg.attention(q, k, v), pkg.attention(q_new, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms: a launch on another stream would run before the copy
        q.copy_(q_new)
        out = pkg.attention(q, k, v)
    side.synchronize()
    assert torch.equal(out, expected_new) and not torch.equal(out, expected_old)


def test_unsupported_configurations_raise(packages):
    pkg = packages["sm90"] if "sm90" in packages else packages["naive"]
    q, k, v = _inputs(1, 64, 64, 8, 8, 128)
    with pytest.raises(pkg.UnsupportedError, match="head_dim=96"):
        pkg.attention(*(t[..., :96].contiguous() for t in (q, k, v)))
    with pytest.raises(pkg.UnsupportedError, match="group 2"):
        pkg.attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(TypeError, match="bfloat16"):
        pkg.attention(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="last dimension"):
        pkg.attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v)
    with pytest.raises(ValueError, match="do not divide"):
        pkg.attention(q[:, :, :7], k[:, :, :2], v[:, :, :2])
