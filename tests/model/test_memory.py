"""model/memory.py's tensor lists equal what a real forward keeps for the backward (the PyTorch
reference kernels, fp32), byte for byte, for every block kind and recompute mode; the Triton
kernels' lists are checked the same way in tests/kernels/test_memory_triton.py."""
import pytest
import torch

from strata.kernels import ops
from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from strata.model.memory import Shape, block_activations, kept_bytes, loss_activations, saved_bytes


def gqa_rope() -> ModelConfig:
    """Every size distinct (d, E, P, N, Q, H, K, D, f) so that a wrong factor cannot hide."""
    cfg = ModelConfig(pattern="M*-", d_model=48, vocab_size=96, max_seq_len=256)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups, cfg.mamba.chunk_size = 12, 20, 2, 16
    cfg.attention.n_heads, cfg.attention.n_kv_heads, cfg.attention.head_dim = 6, 2, 10
    cfg.mlp.d_ff = 112
    cfg.validate()
    return cfg


def mha_relu2() -> ModelConfig:
    cfg = ModelConfig(pattern="M*-", d_model=64, vocab_size=96, max_seq_len=256)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.chunk_size = 16, 8, 32
    cfg.attention.n_heads, cfg.attention.rope = 4, False
    cfg.mlp.activation = "relu2"
    cfg.validate()
    return cfg


def gqa_partial_rope() -> ModelConfig:
    """RoPE on 4 of each head's 10 channels: the tables hold the rotated channels only."""
    cfg = gqa_rope()
    cfg.attention.rope_fraction = 0.4
    cfg.validate()
    return cfg


CONFIGS = {"gqa-rope-swiglu": gqa_rope, "gqa-partial-rope": gqa_partial_rope, "mha-relu2": mha_relu2}


def set_recompute(block, mode: str) -> None:
    block.recompute = mode == "full"
    block.mixer.recompute_core = mode == "selective"


def check_blocks(cfg: ModelConfig, kernels: str, batch: int, seq_len: int, mode: str) -> None:
    model = HybridLM(cfg)
    params = list(model.parameters())
    for i, block in enumerate(model.blocks):
        set_recompute(block, mode)
        x = torch.randn(batch, seq_len, cfg.d_model, requires_grad=True)
        measured = saved_bytes(block, x, exclude=params)
        terms = block_activations(cfg, block.kind, Shape(batch, seq_len, kernels=kernels, act_bytes=4),
                                  dense_mlp=block.spec.dense_mlp)
        assert kept_bytes(terms, mode) == measured, (block.kind, mode)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_activations_are_what_the_reference_forward_keeps(name, mode, monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    torch.manual_seed(0)
    # seq 40 pads to the chunk (16: 48, 32: 64); 64 is a whole number of chunks
    for batch, seq_len in ((3, 40), (2, 64)):
        check_blocks(CONFIGS[name](), "reference", batch, seq_len, mode)


def test_packed_documents_add_the_attention_mask_and_row_rope_tables(monkeypatch):
    from strata.model.hybrid import document_index

    monkeypatch.setenv("STRATA_KERNELS", "reference")
    cfg = gqa_rope()
    model = HybridLM(cfg)
    attention = model.blocks[cfg.pattern.index("*")]
    positions = torch.arange(40).repeat(3, 1)
    positions[:, 17:] -= 17  # a second document from token 17
    x = torch.randn(3, 40, cfg.d_model, requires_grad=True)
    measured = saved_bytes(lambda x: attention(x, position_ids=positions, seq_idx=document_index(positions, 3)),
                           x, exclude=model.parameters())
    terms = block_activations(cfg, "*", Shape(3, 40, kernels="reference", act_bytes=4, documents=True))
    assert kept_bytes(terms, "none") == measured


def loss_kept_and_listed(kernels: str) -> tuple[int, int]:
    """(bytes the final norm and the loss keep for the backward, bytes loss_activations lists) on
    the kernel path STRATA_KERNELS names."""
    cfg = gqa_rope()
    model = HybridLM(cfg)
    x = torch.randn(3, 40, cfg.d_model, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (3 * 40,))

    def loss(x):
        h = model.final_norm(x)
        return ops.linear_cross_entropy(h.reshape(-1, cfg.d_model), model.head_weight, labels)

    listed = sum(t.bytes for t in loss_activations(cfg, Shape(3, 40, kernels=kernels, act_bytes=4)).saved)
    return saved_bytes(loss, x, exclude=model.parameters()), listed


def test_loss_activations_are_what_the_reference_loss_keeps(monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    kept, listed = loss_kept_and_listed("reference")
    assert kept - listed in range(0, 9)  # and a scalar
