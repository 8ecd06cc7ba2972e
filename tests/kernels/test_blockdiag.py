"""Triton block-diagonal matmul (BlockDense, BlockShuffle) against the reference in fp64."""
import pytest
import torch
from kernel_helpers import assert_close, grads, leaves

from strata.kernels.blockdiag.kernel import blockdiag_matmul_triton
from strata.kernels.blockdiag.reference import blockdiag_matmul_ref


@pytest.mark.parametrize("lead,nblocks,m,k,shuffle", [
    pytest.param((3, 5), 4, 24, 40, True, id="shuffle"),
    pytest.param((37,), 2, 64, 16, False, id="dense"),
    pytest.param((2, 63), 3, 17, 33, True, id="odd-shuffle"),
    pytest.param((1,), 1, 16, 16, False, id="one-block"),
    pytest.param((129,), 4, 48, 32, False, id="rows129"),
])
def test_blockdiag_matches_reference(lead, nblocks, m, k, shuffle):
    gen = torch.Generator().manual_seed(0)
    raw = [torch.randn(*lead, nblocks * k, generator=gen), torch.randn(nblocks, m, k, generator=gen) * 0.2]
    x, w = leaves(*raw)
    y = blockdiag_matmul_triton(x, w, shuffle)
    got = grads(y, [x, w])
    x64, w64 = leaves(*raw, dtype=torch.float64)
    y_ref = blockdiag_matmul_ref(x64, w64, shuffle)
    want = grads(y_ref, [x64, w64])
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert_close("y", y, y_ref, 1e-5)
    assert_close("dx", got[0], want[0], 1e-5)
    assert_close("dw", got[1], want[1], 1e-5)


@pytest.mark.parametrize("mode,nblocks", [("strided", 3), ("tiles", 3), ("tiles", 4), ("copy", 4)])
def test_blockdiag_shuffle_modes(monkeypatch, mode, nblocks):
    """Each way of doing the shuffle: fused strided columns, fused (rows, j, block) tiles, or a copy."""
    import strata.kernels.blockdiag.kernel as bd
    monkeypatch.setattr(bd, "SHUFFLE_MODE", mode)
    gen = torch.Generator().manual_seed(1)
    raw = [torch.randn(2, 41, nblocks * 24, generator=gen), torch.randn(nblocks, 40, 24, generator=gen) * 0.2]
    x, w = leaves(*raw)
    y = bd.blockdiag_matmul_triton(x, w, True)
    got = grads(y, [x, w])
    x64, w64 = leaves(*raw, dtype=torch.float64)
    y_ref = blockdiag_matmul_ref(x64, w64, True)
    want = grads(y_ref, [x64, w64])
    assert_close("y", y, y_ref, 1e-5)
    assert_close("dx", got[0], want[0], 1e-5)
    assert_close("dw", got[1], want[1], 1e-5)
