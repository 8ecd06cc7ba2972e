"""Triton RMSNorm (plain, gated, grouped) against the reference in fp64."""
import pytest
import torch
from kernel_helpers import assert_close, grads, leaves

from strata.kernels.norm.kernel import rmsnorm_triton
from strata.kernels.norm.reference import rmsnorm_ref


@pytest.mark.parametrize("shape,group_size,gated", [
    pytest.param((3, 5, 64), None, False, id="plain"),
    pytest.param((2, 7, 96), 32, True, id="gated-3groups"),
    pytest.param((37, 48), None, True, id="gated-2d"),
    pytest.param((1, 1, 80), 40, False, id="grouped-nonpow2"),
    pytest.param((2, 129, 256), 64, True, id="gated-4groups-len129"),
])
def test_rmsnorm_matches_reference(shape, group_size, gated):
    gen = torch.Generator().manual_seed(0)
    raw = [torch.randn(*shape, generator=gen), torch.randn(shape[-1], generator=gen) * 0.5 + 1,
           torch.randn(*shape, generator=gen) if gated else None]
    x, w, z = leaves(*raw)
    y = rmsnorm_triton(x, w, 1e-5, z, group_size)
    got = grads(y, [x, w, z])
    x64, w64, z64 = leaves(*raw, dtype=torch.float64)
    y_ref = rmsnorm_ref(x64, w64, 1e-5, z64, group_size)
    want = grads(y_ref, [x64, w64, z64])
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close("y", y, y_ref, 1e-5)
    for name, a, r in zip(["x", "weight", "z"], got, want):
        if r is not None:
            assert_close(f"d{name}", a, r, 2e-5)


def test_rmsnorm_rejects_bad_group():
    with pytest.raises(ValueError, match="group_size"):
        rmsnorm_triton(torch.randn(2, 10), torch.ones(10), group_size=4)
