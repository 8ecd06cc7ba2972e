"""Triton causal depthwise conv1d (+ SiLU) and its decode step against the reference in fp64."""
import pytest
import torch
from kernel_helpers import assert_close, grads, leaves

from strata.kernels.conv.kernel import causal_conv1d_step_triton, causal_conv1d_triton
from strata.kernels.conv.reference import causal_conv1d_ref, causal_conv1d_step_ref, conv_state_from_inputs


@pytest.mark.parametrize("b,l,d,w,activation,bias", [
    pytest.param(1, 1, 16, 4, "silu", True, id="len1"),
    pytest.param(2, 63, 40, 4, "silu", True, id="len63"),
    pytest.param(1, 129, 20, 3, None, False, id="len129-w3-linear"),
    pytest.param(1, 1134, 24, 4, "silu", True, id="len1134"),
    pytest.param(2, 3, 8, 4, "silu", False, id="shorter-than-width"),
])
def test_conv_matches_reference(b, l, d, w, activation, bias):
    gen = torch.Generator().manual_seed(0)
    raw = [torch.randn(b, l, d, generator=gen), torch.randn(d, w, generator=gen) * 0.5,
           torch.randn(d, generator=gen) if bias else None]
    x, wt, bs = leaves(*raw)
    y = causal_conv1d_triton(x, wt, bs, activation)
    got = grads(y, [x, wt, bs])
    x64, w64, b64 = leaves(*raw, dtype=torch.float64)
    y_ref = causal_conv1d_ref(x64, w64, b64, activation)
    want = grads(y_ref, [x64, w64, b64])
    assert y.dtype == torch.float32
    assert_close("y", y, y_ref, 1e-5)
    for name, a, r in zip(["x", "weight", "bias"], got, want):
        if r is not None:
            assert_close(f"d{name}", a, r, 2e-5)


def test_conv_non_contiguous_input():
    """The model passes a slice of the in_proj output: rows with a stride larger than d."""
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(2, 37, 50, generator=gen)
    x = big[..., 5:29]
    wt = torch.randn(24, 4, generator=gen)
    assert_close("y", causal_conv1d_triton(x, wt, None, "silu"), causal_conv1d_ref(x.double(), wt.double()), 1e-5)


@pytest.mark.parametrize("b,d,w,activation,bias", [(2, 40, 4, "silu", True), (1, 300, 3, None, False)])
def test_conv_step_matches_reference(b, d, w, activation, bias):
    gen = torch.Generator().manual_seed(2)
    x, state = torch.randn(b, d, generator=gen), torch.randn(b, d, w, generator=gen)
    wt, bs = torch.randn(d, w, generator=gen), (torch.randn(d, generator=gen) if bias else None)
    y, new = causal_conv1d_step_triton(x, state, wt, bs, activation)
    y_ref, new_ref = causal_conv1d_step_ref(x.double(), state.double(), wt.double(),
                                            None if bs is None else bs.double(), activation)
    assert_close("y", y, y_ref, 1e-5)
    assert torch.equal(new, new_ref.float()) and new.dtype == state.dtype


def test_conv_steps_continue_the_sequence():
    """Prompt through the conv, then token-by-token steps: the same outputs as one long conv."""
    gen = torch.Generator().manual_seed(3)
    x, wt, bs = torch.randn(1, 12, 16, generator=gen), torch.randn(16, 4, generator=gen), torch.randn(16, generator=gen)
    full = causal_conv1d_triton(x, wt, bs)
    state = conv_state_from_inputs(x[:, :7], 4)
    for t in range(7, 12):
        y, state = causal_conv1d_step_triton(x[:, t], state, wt, bs)
        assert_close(f"y[{t}]", y, full[:, t], 1e-5)
