"""kernels.ops picks Triton, the CPU path or the reference per call, as STRATA_KERNELS and the device say."""
import pytest
import torch

from strata.kernels import ops


def test_backend_choice(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("STRATA_KERNELS", raising=False)
    assert ops.backend_for(t) == "cpu"  # CPU tensor, auto
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    assert ops.backend_for(t) == "reference"
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    assert ops.backend_for(t) == "triton"  # under the interpreter (set by conftest)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.backend_for(t)
    monkeypatch.setenv("STRATA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="not a backend"):
        ops.backend_for(t)


def test_every_op_dispatches_to_triton(monkeypatch):
    """With STRATA_KERNELS=triton each op's output carries the Triton autograd Function."""
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 2, 16, generator=g, requires_grad=True)
    dt = torch.rand(1, 20, 2, generator=g)
    B = C = torch.randn(1, 20, 1, 16, generator=g)
    y = ops.ssd_chunked(x, dt, -torch.ones(2), B, C, 16)
    assert type(y.grad_fn).__name__ == "SSDChunkedBackward"
    xc = torch.randn(1, 9, 8, generator=g, requires_grad=True)
    assert type(ops.causal_conv1d(xc, torch.randn(8, 4)).grad_fn).__name__ == "CausalConv1dBackward"
    assert type(ops.rmsnorm(xc, torch.ones(8)).grad_fn).__name__ == "RMSNormBackward"
    loss = ops.linear_cross_entropy(xc.reshape(-1, 8), torch.randn(30, 8), torch.randint(0, 30, (9,)))
    assert type(loss.grad_fn).__name__ == "LinearCrossEntropyBackward"
    yb = ops.blockdiag_matmul(xc, torch.randn(2, 4, 4), shuffle=True)
    assert type(yb.grad_fn).__name__ == "BlockDiagMatmulBackward"
    # The decode steps: Triton without grad, the reference when a gradient is asked for.
    with torch.no_grad():
        y1, s1 = ops.ssd_step(torch.zeros(1, 2, 16, 16), x[:, 0], dt[:, 0], -torch.ones(2), B[:, 0], C[:, 0])
        y2, s2 = ops.causal_conv1d_step(xc[:, 0], torch.zeros(1, 8, 4), torch.randn(8, 4))
    assert y1.shape == (1, 2, 16) and s1.shape == (1, 2, 16, 16) and y2.shape == (1, 8) and s2.shape == (1, 8, 4)
    y3, _ = ops.causal_conv1d_step(xc[:, 0], torch.zeros(1, 8, 4), torch.randn(8, 4))
    assert y3.requires_grad


def test_reference_forced(monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    x = torch.randn(1, 9, 8, requires_grad=True)
    assert type(ops.rmsnorm(x, torch.ones(8)).grad_fn).__name__ != "RMSNormBackward"


def test_cpu_paths_on_cpu_and_reference_when_forced(monkeypatch):
    """On CPU (auto) the SSD scan, fp32 linears, the fused loss, the conv and RMSNorm are the
    CPU paths' Functions;
    STRATA_KERNELS=reference gives the references' autograd graphs instead."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 2, 16, generator=g, requires_grad=True)
    dt = torch.rand(1, 20, 2, generator=g)
    B = C = torch.randn(1, 20, 1, 16, generator=g)
    h = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g)
    big = torch.randn(2**22 // (30 * 8) + 1, 8, generator=g, requires_grad=True)  # oneDNN only where it pays
    xc = torch.randn(1, 9, 8, generator=g, requires_grad=True)
    names = {"cpu": ("SSDChunkedCPUBackward", "LinearCPUBackward", "LinearCrossEntropyCPUBackward",
                     "CausalConv1dCPUBackward", "RMSNormCPUBackward")}
    for backend in ("auto", "reference"):
        monkeypatch.setenv("STRATA_KERNELS", backend)
        got = (type(ops.ssd_chunked(x, dt, -torch.ones(2), B, C, 16).grad_fn).__name__,
               type(ops.linear(big, w).grad_fn).__name__,
               type(ops.linear_cross_entropy(big, w, torch.randint(0, 30, big.shape[:1])).grad_fn).__name__,
               type(ops.causal_conv1d(xc, torch.randn(8, 4)).grad_fn).__name__,
               type(ops.rmsnorm(xc, torch.ones(8)).grad_fn).__name__)
        if backend == "auto":
            assert got == names["cpu"]
        else:
            assert not set(got) & set(names["cpu"])
    monkeypatch.delenv("STRATA_KERNELS")
    assert type(ops.linear(h, w).grad_fn).__name__ == "MmBackward0"  # small: F.linear
    assert type(ops.linear(big.double(), w.double()).grad_fn).__name__ == "MmBackward0"  # fp64: F.linear
