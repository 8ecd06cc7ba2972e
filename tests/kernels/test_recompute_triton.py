"""Activation recompute through the Triton kernels (kernels.ops dispatch, under the interpreter):
selective and full recompute give the loss and gradients of no recompute with the Triton SSD,
conv, gated norm, block-diagonal matmul and fused cross-entropy as the forward used them."""
from __future__ import annotations

import pytest
import torch

from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from strata.parallel.engine.parallelize import apply_recompute


def loss_and_grads(mode: str):
    cfg = ModelConfig(pattern="M-", d_model=32, vocab_size=64, max_seq_len=16)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.chunk_size = 16, 16, 8
    cfg.mlp.d_ff, cfg.mlp.structure, cfg.mlp.nblocks, cfg.mlp.dense_first_layer = 64, "blockshuffle", 2, False
    cfg.validate()
    torch.manual_seed(0)
    model = apply_recompute(HybridLM(cfg), [mode] * 2)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    loss = model(ids, labels=labels)
    assert type(loss.grad_fn).__name__ == "LinearCrossEntropyBackward"
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def triton_runs():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRATA_KERNELS", "triton")
        yield {mode: loss_and_grads(mode) for mode in ("none", "selective", "full")}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_through_triton_kernels_is_exact(triton_runs, mode):
    want_loss, want = triton_runs["none"]
    loss, grads = triton_runs[mode]
    assert torch.equal(loss, want_loss)
    bad = [n for n in want if not torch.equal(grads[n], want[n])]
    assert not bad, f"gradients differ: {bad}"
