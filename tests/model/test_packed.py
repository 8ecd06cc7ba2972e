"""Packed documents: where position ids restart at 0 a new document starts, and each document
of a packed row gets the logits and every gradient it gets run alone (float64, 1e-10, the
PyTorch references), in a model of every block kind, under selective and full recompute too; rows
without a restart take the one-document path."""
import pytest
import torch

from strata.model.config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig
from strata.model.hybrid import HybridLM, document_index
from strata.parallel.engine.parallelize import apply_recompute

CHUNK, VOCAB = 8, 61
# Two rows each, the documents' lengths (the rows of one case have the same total).
LAYOUTS = {
    "length_one": ([1, 5, 1, 1, 9, 1], [3, 1, 14]),
    "chunk_edges": ([8, 8, 2], [16, 1, 1]),
    "several_per_chunk": ([2, 3, 2, 6, 5], [1, 2, 1, 2, 12]),
    "crossing_chunks": ([19, 4], [7, 10, 6]),
}


def model_of(pattern: str, rope_fraction: float = 1.0, **mamba) -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(pattern=pattern, d_model=32, vocab_size=VOCAB, max_seq_len=64, tie_embeddings=False,
                      mamba=MambaConfig(d_state=8, headdim=16, ngroups=2, chunk_size=CHUNK, **mamba),
                      attention=AttentionConfig(n_heads=4, n_kv_heads=2, rope_fraction=rope_fraction),
                      mlp=MLPConfig(d_ff=64))
    model = HybridLM(cfg).double()
    with torch.no_grad():  # larger weights: states and attention far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def packed_positions(rows) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])


def documents(rows):
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            yield b, start, start + n
            start += n


def packed_and_alone(model: HybridLM, rows, ids: torch.Tensor):
    """(logits, gradients) of the packed rows and of every document alone, for <logits, r>."""
    r = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = [p for p in model.parameters()]
    logits = model(ids, position_ids=packed_positions(rows))
    packed_grads = torch.autograd.grad((logits * r).sum(), params, allow_unused=True)
    alone, loss = torch.empty_like(logits), 0
    for b, start, stop in documents(rows):
        out = model(ids[b:b + 1, start:stop], position_ids=torch.arange(stop - start)[None])
        alone[b:b + 1, start:stop] = out.detach()
        loss = loss + (out * r[b:b + 1, start:stop]).sum()
    alone_grads = torch.autograd.grad(loss, params, allow_unused=True)
    return logits.detach(), alone, packed_grads, alone_grads


def assert_isolated(model, rows):
    ids = torch.randint(0, VOCAB, (len(rows), sum(rows[0])), generator=torch.Generator().manual_seed(1))
    logits, alone, got, want = packed_and_alone(model, rows, ids)
    err = ((logits - alone).abs().max() / alone.abs().max()).item()
    assert err < 1e-10, f"logits off by {err:.2e}"
    names = [n for n, _ in model.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item()
            assert err < 1e-10, f"{name}: gradient off by {err:.2e}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_documents_equal_documents_alone(layout, monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    assert_isolated(model_of("M*-M"), LAYOUTS[layout])


def test_packed_documents_with_partial_rope(monkeypatch):
    """RoPE on half of each head's channels: the rotated ones restart with each document's positions."""
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    assert_isolated(model_of("M*-M", rope_fraction=0.5), LAYOUTS["several_per_chunk"])


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_packed_documents_under_recompute(mode, monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    model = model_of("M*-M", dt_limit=[0.004, 0.1])
    apply_recompute(model, [mode] * len(model.blocks))
    assert_isolated(model, LAYOUTS["several_per_chunk"])


def test_no_restart_takes_the_one_document_path():
    assert document_index(None) is None
    assert document_index(torch.arange(10)[None].expand(3, -1)) is None
    assert document_index(torch.arange(5, 15)[None]) is None  # a row continuing a document
    seq_idx = document_index(torch.tensor([[3, 4, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5]]))
    assert seq_idx.tolist() == [[0, 0, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0]]
    assert document_index(torch.tensor([0, 1, 0]), batch_size=2).tolist() == [[0, 0, 1], [0, 0, 1]]
    model = model_of("M*-M")
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids, position_ids=torch.arange(20)[None].expand(2, -1)))
