"""Packed documents (seq_idx) in the SSD scan and the causal conv: each document of a packed
row gets the outputs, final state and gradients it gets alone. The references in fp64 to
1e-10; the Triton kernels (under the interpreter) in fp32 to 1e-5."""
import pytest
import torch
from kernel_helpers import leaves

from strata.kernels import ops
from tests.model.test_packed import CHUNK, LAYOUTS, documents

# (backend, dtype, tolerance): the references in fp64, the Triton kernels (interpreter) in fp32
BACKENDS = [("reference", torch.float64, 1e-10), ("triton", torch.float32, 1e-5)]


def seq_idx_of(rows) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def compare(packed, alone, leaves_, rows, tol):
    """packed(seq_idx) -> outputs (b, l, ...); alone(b, start, stop) -> that document's outputs.
    Compares the outputs and the gradients of <outputs, r> for a fixed random r."""
    seq_idx = seq_idx_of(rows)
    y = packed(seq_idx)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    want_parts, loss_alone = [], 0
    for b, start, stop in documents(rows):
        ya = alone(b, start, stop)
        want_parts.append((b, start, stop, ya))
        loss_alone = loss_alone + (ya * r[b:b + 1, start:stop]).sum()
    for b, start, stop, ya in want_parts:
        err = (y[b:b + 1, start:stop] - ya).abs().max().item() / ya.abs().max().clamp_min(1e-30).item()
        assert err < tol, f"document [{start}, {stop}) of row {b}: outputs off by {err:.2e}"
    present = [t for t in leaves_ if t is not None and t.requires_grad]
    got = torch.autograd.grad((y * r).sum(), present)
    want = torch.autograd.grad(loss_alone, present)
    for i, (g, w) in enumerate(zip(got, want)):
        err = (g - w).abs().max().item() / w.abs().max().clamp_min(1e-30).item()
        assert err < tol, f"gradient {i}: off by {err:.2e}"


def ssd_inputs(rows, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, l, h, p, g, n = len(rows), sum(rows[0]), 4, 8, 2, 8

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    return leaves(r(b, l, h, p), r(b, l, h, scale=0.5), -(torch.rand(h, generator=gen, dtype=torch.float64) * 2 + 0.2),
                  r(b, l, g, n, scale=0.5), r(b, l, g, n, scale=0.5), r(h), r(b, l, h, p), r(h, scale=0.5), dtype=dtype)


def check_ssd(rows, dtype, tol, backend, monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", backend)
    x, dt, A, B, C, D, z, dt_bias = ssd_inputs(rows, dtype)

    def run(sl, seq_idx=None):
        return ops.ssd_chunked(x[sl], dt[sl], A, B[sl], C[sl], CHUNK, D=D, z=z[sl], dt_bias=dt_bias,
                               dt_softplus=True, seq_idx=seq_idx)

    compare(lambda seq_idx: run((slice(None), slice(None)), seq_idx),
            lambda b, start, stop: run((slice(b, b + 1), slice(start, stop))),
            [x, dt, A, B, C, D, z, dt_bias], rows, tol)


def check_ssd_states(rows, dtype, tol, backend, monkeypatch):
    """initial_states belong to the first document, the final state is the last one's."""
    monkeypatch.setenv("STRATA_KERNELS", backend)
    x, dt, A, B, C, D, z, dt_bias = ssd_inputs(rows, dtype, seed=1)
    init = leaves(torch.randn(len(rows), 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                  dtype=dtype)[0]
    seq_idx = seq_idx_of(rows)
    y, final = ops.ssd_chunked(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True,
                               initial_states=init, return_final_states=True, seq_idx=seq_idx)
    for b, lengths in enumerate(rows):
        first, last = lengths[0], sum(lengths) - lengths[-1]
        row = slice(b, b + 1)
        y0 = ops.ssd_chunked(x[row, :first], dt[row, :first], A, B[row, :first], C[row, :first], CHUNK, D=D,
                             dt_bias=dt_bias, dt_softplus=True, initial_states=init[row])
        _, fin = ops.ssd_chunked(x[row, last:], dt[row, last:], A, B[row, last:], C[row, last:], CHUNK, D=D,
                                 dt_bias=dt_bias, dt_softplus=True, return_final_states=True)
        assert (y[row, :first] - y0).abs().max() / y0.abs().max() < tol
        assert (final[row] - fin).abs().max() / fin.abs().max() < tol


def check_conv(rows, dtype, tol, backend, monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", backend)
    gen = torch.Generator().manual_seed(3)
    b, l, d, w = len(rows), sum(rows[0]), 6, 4
    x, weight, bias = leaves(torch.randn(b, l, d, generator=gen, dtype=torch.float64),
                             torch.randn(d, w, generator=gen, dtype=torch.float64),
                             torch.randn(d, generator=gen, dtype=torch.float64), dtype=dtype)
    compare(lambda seq_idx: ops.causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx),
            lambda i, start, stop: ops.causal_conv1d(x[i:i + 1, start:stop], weight, bias, "silu"),
            [x, weight, bias], rows, tol)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ssd_isolates_documents(layout, backend, dtype, tol, monkeypatch):
    check_ssd(LAYOUTS[layout], dtype, tol, backend, monkeypatch)


# every layout on the reference; two under the interpreter, which is slow
STATE_CASES = [(layout, *BACKENDS[0]) for layout in LAYOUTS] + \
              [(layout, *BACKENDS[1]) for layout in ("length_one", "crossing_chunks")]


@pytest.mark.parametrize("layout,backend,dtype,tol", STATE_CASES)
def test_ssd_states_of_first_and_last_document(layout, backend, dtype, tol, monkeypatch):
    check_ssd_states(LAYOUTS[layout], dtype, tol, backend, monkeypatch)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_conv_isolates_documents(layout, backend, dtype, tol, monkeypatch):
    check_conv(LAYOUTS[layout], dtype, tol, backend, monkeypatch)


def test_one_document_is_todays_path(monkeypatch):
    """seq_idx all zeros gives what no seq_idx gives."""
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    x, dt, A, B, C, D, z, dt_bias = ssd_inputs(LAYOUTS["crossing_chunks"], torch.float64)
    zeros = torch.zeros(x.shape[:2], dtype=torch.long)
    y0 = ops.ssd_chunked(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    y1 = ops.ssd_chunked(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, seq_idx=zeros)
    assert (y0 - y1).abs().max() < 1e-12
