"""Shared checks for the kernel tests: the Triton op in fp32 against the reference in fp64."""
from __future__ import annotations

import torch


def leaves(*tensors, dtype=torch.float32):
    """Fresh leaf copies (requiring grad) in `dtype`; None stays None."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in tensors]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_close(name: str, got, want, tol: float):
    assert got is not None and want is not None, f"{name}: missing"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def grads(out, inputs, seed=123):
    """Gradients of <out, r> for a fixed random r (out may be a tuple of tensors)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    present = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, present))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]
