"""FP8 linears (kernels/fp8) against their float64 emulation (reference.py): the quantised operands
bit for bit, the output and both gradients to float32 rounding, for both recipes; the dispatch
(ops.linear) runs FP8 exactly where the sizes allow it; a product nobody can run says why."""
import pytest
import torch
import torch.nn.functional as F

from strata.kernels import ops
from strata.kernels.fp8 import scaled
from strata.kernels.fp8.recipe import RECIPES, fp8_max, operand_dtypes
from strata.kernels.fp8.reference import fp8_linear_grads_ref, fp8_linear_ref, quantise_ref
from strata.kernels.fp8.scaled import fp8_linear, quantise

F32_TOL = 1e-6
"""FP8 products are exact in float32 but for the accumulation's rounding (K = 48 here)."""


def operands(dtype=torch.float32, seed=0):
    """x (32, 48), weight (64, 48) and an output gradient, with a few values far out (maxima that
    set the scales, as outliers do in training) and a zero row (the EPS floor of its row scale)."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(32, 48, generator=g), torch.randn(64, 48, generator=g) * 0.02
    dy = torch.randn(32, 64, generator=g)
    x[5, 7], w[3, 2], dy[9, 11] = 40.0, -0.5, 1e-3
    x[30] = 0.0
    return x.to(dtype), w.to(dtype), dy.to(dtype)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def runs_fp8(y: torch.Tensor) -> bool:
    """Whether y's autograd graph holds the FP8 product."""
    todo, seen = [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "FP8LinearBackward":
            return True
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return False


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_quantised_operands_equal_the_float64_emulation_bit_for_bit(recipe, dim):
    x, _, dy = operands()
    for t, dtype in ((x, operand_dtypes(recipe)[0]), (dy, operand_dtypes(recipe)[1])):
        q, inv = quantise(t, dtype, recipe, dim)
        want_q, want_scale = quantise_ref(t, dtype, recipe, dim)
        assert q.dtype == dtype
        assert torch.equal(q.double(), want_q), f"{(q.double() != want_q).sum()} values off"
        assert torch.allclose(inv.double(), 1 / want_scale, rtol=1e-7, atol=0)
        assert q.double().abs().max() <= fp8_max(dtype)
        if recipe == "rowwise":  # one scale per slice, powers of two
            assert inv.shape == ((1, t.shape[1]) if dim == 0 else (t.shape[0], 1))
            assert torch.equal(torch.log2(inv), torch.log2(inv).round())


def test_tensorwise_gradients_are_e5m2_and_rowwise_all_e4m3():
    assert operand_dtypes("tensorwise") == (torch.float8_e4m3fn, torch.float8_e5m2)
    assert operand_dtypes("rowwise") == (torch.float8_e4m3fn, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="'blockwise' is not one of 'tensorwise', 'rowwise'"):
        operand_dtypes("blockwise")


@pytest.mark.parametrize("recipe", RECIPES)
def test_output_and_gradients_equal_the_float64_emulation(recipe):
    x, w, dy = operands()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xg, wg, None, recipe)
    y.backward(dy)
    assert runs_fp8(y)
    assert rel(y, fp8_linear_ref(x, w, recipe)) < F32_TOL
    dx, dw = fp8_linear_grads_ref(x, w, dy, recipe)
    assert rel(xg.grad, dx) < F32_TOL and rel(wg.grad, dw) < F32_TOL
    exact = x.double() @ w.double().t()
    assert 1e-3 < rel(y, exact) < 0.1, "FP8, not the full-precision product"


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_and_autocast_compute_in_bf16_and_return_gradients_in_the_parameters_dtype(recipe):
    x, w, dy = operands()
    xg, wg, bias = x.clone().requires_grad_(), w.clone().requires_grad_(), torch.zeros(64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(xg, wg, bias, recipe)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert xg.grad.dtype == wg.grad.dtype == bias.grad.dtype == torch.float32
    assert rel(y, fp8_linear_ref(x.bfloat16(), w.bfloat16(), recipe)) < 2 ** -8  # bf16 operands, output rounded
    dx, dw = fp8_linear_grads_ref(x.bfloat16(), w.bfloat16(), dy.bfloat16(), recipe)
    assert rel(xg.grad, dx) < 2 ** -8 and rel(wg.grad, dw) < 2 ** -8


def test_ops_linear_takes_fp8_where_the_sizes_allow_it_else_exactly_the_plain_product():
    x, w, _ = operands()
    assert runs_fp8(ops.linear(x.requires_grad_(), w, fp8="rowwise"))
    for x_odd, w_odd in ((x[:30], w), (x[:, :40], w[:, :40]), (x, w[:56])):  # tokens, inputs, outputs
        assert torch.equal(ops.linear(x_odd, w_odd, fp8="rowwise"), F.linear(x_odd, w_odd))
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


def test_unavailable_names_the_reason_in_one_line(monkeypatch):
    assert scaled.unavailable("rowwise", torch.device("cpu")) is None

    def refuse(*args, **kwargs):
        raise RuntimeError("_scaled_mm_out_cpu not implemented for 'Float8_e4m3fn'\nstack trace ...")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    assert scaled.unavailable("tensorwise", torch.device("cpu")) == \
        "torch._scaled_mm says: _scaled_mm_out_cpu not implemented for 'Float8_e4m3fn'"
