"""The compiled Triton kernels on CUDA: fp32 against the fp64 reference at odd shapes,
bf16 against the fp32 reference, and the model's autocast usage (bf16 activations,
fp32 parameters). Runs only with STRATA_GPU_TESTS=1 on a CUDA machine (see conftest)."""
import pytest
import torch
from kernel_helpers import assert_close, grads, leaves

from strata.kernels import ops  # noqa: E402
from strata.kernels.attention.reference import document_attention_ref  # noqa: E402
from strata.kernels.attention.varlen import varlen_supported  # noqa: E402
from strata.kernels.blockdiag.reference import blockdiag_matmul_ref  # noqa: E402
from strata.kernels.conv.reference import causal_conv1d_ref  # noqa: E402
from strata.kernels.cross_entropy.reference import linear_cross_entropy_ref  # noqa: E402
from strata.kernels.norm.reference import rmsnorm_ref  # noqa: E402
from strata.kernels.ssd.reference import ssd_chunked_ref, ssd_step_ref  # noqa: E402

DEV = "cuda"


def _compare(tri, ref, raw, dtype, fwd_tol, grad_tol, ref_dtype=torch.float64, skip_grad=()):
    ti = leaves(*raw, dtype=dtype)
    ri = leaves(*raw, dtype=ref_dtype)
    ti = [t if (t is None or raw[i].is_floating_point()) else raw[i] for i, t in enumerate(ti)]
    ri = [t if (t is None or raw[i].is_floating_point()) else raw[i] for i, t in enumerate(ri)]
    y, y_ref = tri(*ti), ref(*ri)
    ys = y if isinstance(y, tuple) else (y,)
    yr = y_ref if isinstance(y_ref, tuple) else (y_ref,)
    for k, (a, r) in enumerate(zip(ys, yr)):
        assert_close(f"out{k}", a, r, fwd_tol)
    gt, gr = grads(y, ti), grads(y_ref, ri)
    for k, (a, r) in enumerate(zip(gt, gr)):
        if r is not None and k not in skip_grad:
            assert_close(f"grad{k}", a, r, grad_tol)


def _ssd_raw(b, l, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return [r(b, l, h, p), r(b, l, h) * 0.5 - 1, -(torch.rand(h, generator=gen) * 2 + 0.2), r(b, l, g, n) * 0.3,
            r(b, l, g, n) * 0.3, r(h), r(b, l, h, p), r(h) * 0.5, r(b, h, p, n)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("l,h,p,g,n,chunk", [(1, 2, 64, 1, 128, 256), (129, 4, 64, 2, 64, 64),
                                             (1134, 4, 32, 1, 128, 256)])
def test_ssd_gpu(dtype, tol, l, h, p, g, n, chunk):
    raw = [t.to(DEV) for t in _ssd_raw(2, l, h, p, g, n)]

    def run(fn):
        return lambda x, dt, A, B, C, D, z, bias, s0: fn(x, dt, A, B, C, chunk, D, z, bias, True, s0, True)
    _compare(run(ops.ssd_chunked), run(ssd_chunked_ref), raw, dtype, tol, 3 * tol,
             ref_dtype=torch.float64 if dtype == torch.float32 else torch.float32)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_ssd_gpu_packed_documents(dtype, tol):
    """seq_idx at the 1.3B model's chunk (256): documents of 1 token, inside a chunk, across chunk
    edges and starting on one, against the reference, forward, final state and gradients."""
    raw = [t.to(DEV) for t in _ssd_raw(2, 1100, 4, 64, 2, 128)]
    lengths = ([1, 255, 1, 300, 256, 287], [700, 1, 1, 398])
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(DEV)

    def run(fn):
        return lambda x, dt, A, B, C, D, z, bias, s0: fn(x, dt, A, B, C, 256, D, z, bias, True, s0, True,
                                                          seq_idx=seq_idx)
    _compare(run(ops.ssd_chunked), run(ssd_chunked_ref), raw, dtype, tol, 3 * tol,
             ref_dtype=torch.float64 if dtype == torch.float32 else torch.float32)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_document_attention_gpu_varlen(dtype, tol):
    """Packed attention on CUDA takes FlashAttention's variable-length kernel, and it equals the
    block-causal SDPA reference in fp32 (documents of 1 token, of a few, longer than a flash block),
    forward and the gradients of q, k and v; a second packing of the same shape reuses nothing."""
    gen = torch.Generator().manual_seed(4)
    lengths = ([1, 127, 1, 300, 171], [7, 1, 592])
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(DEV)
    raw = [torch.randn(2, 8, 600, 128, generator=gen).to(DEV) for _ in range(3)]
    assert varlen_supported(raw[0].to(dtype)), "no FlashAttention varlen kernel for this PyTorch or GPU"
    _compare(lambda q, k, v: ops.document_attention(q, k, v, seq_idx),
             lambda q, k, v: document_attention_ref(q, k, v, seq_idx), raw, dtype, tol, 2 * tol, torch.float32)
    other = torch.stack([torch.repeat_interleave(torch.arange(2), torch.tensor([300, 300]))] * 2).to(DEV)
    q, k, v = (t.to(dtype) for t in raw)
    assert_close("second packing", ops.document_attention(q, k, v, other),
                 document_attention_ref(*(t.float() for t in raw), other), tol)


def test_ssd_gpu_dt_limit():
    """dt clamped at both ends (softplus(dt + bias) spans ~0.1 to ~0.7 here), forward and gradients."""
    raw = [t.to(DEV) for t in _ssd_raw(2, 129, 4, 64, 2, 64)]
    limit = (0.25, 0.45)

    def run(fn):
        return lambda x, dt, A, B, C, D, z, bias, s0: fn(x, dt, A, B, C, 64, D, z, bias, True, s0, True, limit)
    _compare(run(ops.ssd_chunked), run(ssd_chunked_ref), raw, torch.float32, 1e-4, 3e-4)
    st, x, dt, A, B, C, D, z, bias = [t[:, 0] if t.dim() > 2 and t.shape[1] == 129 else t for t in
                                      (raw[8], raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7])]
    y, s = ops.ssd_step(st, x, dt, A, B, C, D, z, bias, True, limit)
    y_ref, s_ref = ssd_step_ref(st, x, dt, A, B, C, D, z, bias, True, limit)
    assert_close("y", y, y_ref, 1e-5)
    assert_close("state", s, s_ref, 1e-5)


def test_ssd_step_gpu():
    raw = _ssd_raw(3, 1, 4, 64, 2, 128)
    st, x, dt, A, B, C, D, z, bias = [t.to(DEV) for t in (raw[8], raw[0][:, 0], raw[1][:, 0], raw[2], raw[3][:, 0],
                                                             raw[4][:, 0], raw[5], raw[6][:, 0], raw[7])]
    y, s = ops.ssd_step(st, x, dt, A, B, C, D, z, bias, True)
    y_ref, s_ref = ssd_step_ref(st, x, dt, A, B, C, D, z, bias, True)
    assert_close("y", y, y_ref, 1e-5)
    assert_close("state", s, s_ref, 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_conv_norm_blockdiag_gpu(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    _compare(ops.causal_conv1d, causal_conv1d_ref, [r(2, 1134, 272), r(272, 4) * 0.3, r(272)], dtype, tol, 2 * tol,
             ref_dtype)
    _compare(lambda x, w, z: ops.rmsnorm(x, w, 1e-5, z, 128), lambda x, w, z: rmsnorm_ref(x, w, 1e-5, z, 128),
             [r(3, 129, 512), r(512) * 0.2 + 1, r(3, 129, 512)], dtype, tol, 2 * tol, ref_dtype)
    _compare(lambda x, w: ops.rmsnorm(x, w), lambda x, w: rmsnorm_ref(x, w), [r(1000, 2048), r(2048)], dtype, tol,
             2 * tol, ref_dtype)
    for shuffle in (False, True):
        _compare(lambda x, w: ops.blockdiag_matmul(x, w, shuffle), lambda x, w: blockdiag_matmul_ref(x, w, shuffle),
                 [r(3, 333, 4 * 96), r(4, 80, 96) * 0.1], dtype, 1e-4 if dtype == torch.float32 else tol,
                 1e-4 if dtype == torch.float32 else 2 * tol, ref_dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_linear_cross_entropy_gpu(dtype, tol):
    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(1000, 256, generator=gen).to(DEV), (torch.randn(5003, 256, generator=gen) * 0.05).to(DEV)
    t = torch.randint(0, 5003, (1000,), generator=gen).to(DEV)
    t[::7] = -100
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    _compare(lambda a, b: ops.linear_cross_entropy(a, b, t, chunk_size=128),
             lambda a, b: linear_cross_entropy_ref(a, b, t), [h, w], dtype, tol, 2 * tol, ref_dtype)


def test_ops_under_autocast():
    """bf16 activations and fp32 parameters under autocast, as the model runs them."""
    gen = torch.Generator().manual_seed(3)
    raw = [t.to(DEV) for t in _ssd_raw(2, 300, 4, 64, 1, 128)]
    x, dt, A, B, C, D, z, bias, s0 = leaves(*raw)
    ref_in = leaves(*raw)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        xb, dtb, Bb, Cb = (t.to(torch.bfloat16) for t in (x, dt, B, C))
        y = ops.ssd_chunked(xb, dtb, A, Bb, Cb, 256, D=D, dt_bias=bias, dt_softplus=True)
        w = torch.randn(256, 64, generator=gen).to(DEV).requires_grad_()
        loss = ops.linear_cross_entropy(y.reshape(-1, 64), w, torch.randint(0, 256, (y.numel() // 64,)).to(DEV))
    assert y.dtype == torch.bfloat16
    loss.backward()
    for t in (x, dt, A, B, C, D, bias, w):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.dtype == torch.float32
    y_ref = ssd_chunked_ref(*(ref_in[:5]), 256, D=ref_in[5], dt_bias=ref_in[7], dt_softplus=True)
    assert_close("y", y.float(), y_ref, 3e-2)
