"""Triton fused linear cross-entropy against the reference in fp64, on one process and
vocab-parallel over two gloo processes."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kernel_helpers import assert_close, leaves

from strata.kernels.cross_entropy.kernel import linear_cross_entropy_triton
from strata.kernels.cross_entropy.reference import linear_cross_entropy_ref, vocab_parallel_linear_cross_entropy_ref
from tests.parallel.dist_helpers import leave_process


def make(n, d, vocab, ignore_every=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, d, generator=gen), torch.randn(vocab, d, generator=gen) * 0.3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def reference(hidden, weight, targets, reduction="mean", scale=1.7):
    h, w = leaves(hidden, weight, dtype=torch.float64)
    loss = linear_cross_entropy_ref(h, w, targets, -100, reduction)
    return (loss, *torch.autograd.grad(loss * scale, (h, w)))


@pytest.mark.parametrize("n,d,vocab,chunk,reduction", [
    pytest.param(37, 32, 1000, 16, "mean", id="3chunks"),
    pytest.param(5, 16, 77, None, "sum", id="tiny-sum"),
    pytest.param(64, 48, 3000, None, "mean", id="vocab3000"),
    pytest.param(1, 16, 50, None, "mean", id="one-token"),
])
def test_linear_cross_entropy_matches_reference(n, d, vocab, chunk, reduction):
    hidden, weight, targets = make(n, d, vocab, ignore_every=4 if n > 1 else 0)
    h, w = leaves(hidden, weight)
    loss = linear_cross_entropy_triton(h, w, targets, -100, reduction, chunk_size=chunk)
    dh, dw = torch.autograd.grad(loss * 1.7, (h, w))
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, targets, reduction)
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close("loss", loss, ref_loss, 1e-6)
    assert_close("dhidden", dh, ref_dh, 1e-5)
    assert_close("dweight", dw, ref_dw, 1e-5)


def test_linear_cross_entropy_no_grad_and_leading_dims():
    hidden, weight, targets = make(24, 16, 200)
    with torch.no_grad():
        loss = linear_cross_entropy_triton(hidden.reshape(2, 12, 16), weight, targets.reshape(2, 12), chunk_size=16)
    assert_close("loss", loss, reference(hidden, weight, targets)[0], 1e-6)



def test_gradients_are_scaled_in_place_once():
    """The backward scales the forward's gradients in place (no second copy of grad_weight): a
    second backward through the same graph is refused instead of scaling them twice."""
    hidden, weight, targets = make(20, 16, 100)
    h, w = leaves(hidden, weight)
    loss = linear_cross_entropy_triton(h, w, targets, chunk_size=8)
    dh, dw = torch.autograd.grad(loss * 1.7, (h, w), retain_graph=True)
    assert dw.dtype == w.dtype
    _, ref_dh, ref_dw = reference(hidden, weight, targets)
    assert_close("dhidden", dh, ref_dh, 1e-5)
    assert_close("dweight", dw, ref_dw, 1e-5)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(loss, (h, w))


def test_one_chunk_of_logits_lives_at_a_time():
    """The chunk's logits are the loss's largest buffer: the next chunk's are made after the last
    ones are freed (each chunk's logits are a matmul's output of their shape; the interpreter's
    views of them share their storage)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    chunk, vocab = 8, 100
    alive, most = [], [0]

    class CountLogits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default and tuple(out.shape) == (chunk, vocab):
                alive[:] = [r for r in alive if r() is not None] + [weakref.ref(out)]
                most[0] = max(most[0], len(alive))
            return out

    hidden, weight, targets = make(4 * chunk, 16, vocab)
    h, w = leaves(hidden, weight)
    with CountLogits():
        loss = linear_cross_entropy_triton(h, w, targets, chunk_size=chunk)
    assert most[0] == 1
    assert_close("loss", loss, reference(hidden, weight, targets)[0], 1e-6)


def _vocab_parallel_worker(rank, world, init_file, shards):
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        hidden, weight, targets = make(40, 32, sum(shards))
        ref_loss, ref_dh, ref_dw = reference(hidden, weight, targets)
        start = sum(shards[:rank])
        shard = weight[start:start + shards[rank]]
        impls = (("triton", linear_cross_entropy_triton), ("reference", vocab_parallel_linear_cross_entropy_ref))
        for name, fn in impls:
            h, w = leaves(hidden, shard)
            if name == "triton":
                loss = fn(h, w, targets, process_group=dist.group.WORLD, vocab_start=start, chunk_size=16)
            else:
                loss = fn(h, w, targets, -100, "mean", dist.group.WORLD, start)
            dh, dw = torch.autograd.grad(loss * 1.7, (h, w))
            assert_close(f"{name} loss", loss, ref_loss, 1e-6)
            assert_close(f"{name} dhidden", dh, ref_dh, 1e-5)
            assert_close(f"{name} dweight", dw, ref_dw[start:start + shards[rank]], 1e-5)
    finally:
        dist.destroy_process_group()
    leave_process()


def test_vocab_parallel_linear_cross_entropy():
    """A head split 300 + 212 over two processes gives the loss and gradients of the whole head."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_vocab_parallel_worker, args=(2, os.path.join(tmp, "init"), (300, 212)), nprocs=2, join=True)
