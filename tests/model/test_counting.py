"""Parameter counts equal the model's sum(p.numel()); FLOPs per token match a hand computation."""
import pytest

from strata.model.config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig
from strata.model.counting import (count_parameters, format_counts, forward_flops_per_token, mamba_block_flops,
                                   training_flops_per_token)
from strata.model.hybrid import HybridLM

CONFIGS = {
    "default-tied": ModelConfig(vocab_size=300),
    "biases-untied-gqa-groups": ModelConfig(
        pattern="M*-M-*", d_model=64, vocab_size=300, tie_embeddings=False,
        mamba=MambaConfig(d_state=128, headdim=64, ngroups=2, proj_bias=True, conv_bias=False),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=24, qkv_bias=True),
        mlp=MLPConfig(activation="relu2", bias=True)),
    "lowrank": ModelConfig(pattern="M-*-", d_model=64, vocab_size=300, mlp=MLPConfig(structure="lowrank", rank=16)),
    "blockdense-self-guided": ModelConfig(
        pattern="M--*-", d_model=64, vocab_size=300,
        mlp=MLPConfig(structure="blockdense", rank=32, nblocks=4, self_guided=True)),
    "blockshuffle-bias-relu2": ModelConfig(
        pattern="-M-", d_model=64, vocab_size=300, tie_embeddings=False,
        mlp=MLPConfig(structure="blockshuffle", nblocks=4, bias=True, activation="relu2", dense_first_layer=False)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_counted_parameters_equal_the_models(name):
    cfg = CONFIGS[name]
    cfg.validate()
    model = HybridLM(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_kind = {"M": 0, "*": 0, "-": 0}
    for block in model.blocks:
        per_kind[block.kind] += sum(p.numel() for p in block.parameters())
    assert {k: counts[k] for k in per_kind} == per_kind


def hand_example() -> ModelConfig:
    """d=8, E=16, P=8 (h=2), N=4, g=1, w=4, Q=4; H=2, K=1, D=4; relu2 f=16; V=10, untied."""
    return ModelConfig(pattern="M*-", d_model=8, vocab_size=10, tie_embeddings=False,
                       mamba=MambaConfig(d_state=4, headdim=8, ngroups=1, d_conv=4, chunk_size=4),
                       attention=AttentionConfig(n_heads=2, n_kv_heads=1),
                       mlp=MLPConfig(activation="relu2", d_ff=16))


def test_parameters_of_the_hand_example():
    counts = count_parameters(hand_example())
    # M: norm 8 + in_proj 8*(2*16 + 2*1*4 + 2) = 336 + conv (16 + 8)*4 + 24 bias = 120 + dt/A/D 3*2
    #    + gated norm 16 + out_proj 16*8 = 128  -> 614
    # *: norm 8 + q 8*2*4 = 64 + k, v 2*8*1*4 = 64 + o 64 -> 200;  -: norm 8 + 8*16 + 16*8 -> 264
    assert counts == {"embedding": 80, "M": 614, "*": 200, "-": 264, "final_norm": 8, "lm_head": 80, "total": 1246}
    assert counts["total"] == sum(p.numel() for p in HybridLM(hand_example()).parameters())


def test_flops_per_token_of_the_hand_example():
    cfg, seq_len = hand_example(), 6
    assert mamba_block_flops(cfg) == {
        "projections": 2 * 8 * 42 + 2 * 16 * 8,    # 928
        "conv": 2 * 24 * 4,                        # 192
        "ssd_scores": 2 * 1 * 4 * 4 / 2,           # 16: C_i.B_j per group, causal half of the chunk
        "ssd_scores_x": 2 * 2 * 8 * 4 / 2,         # 64
        "ssd_chunk_states": 2 * 2 * 8 * 4,         # 128
        "ssd_state_passing": 2 * 2 * 8 * 4 / 4,    # 32
        "ssd_state_output": 2 * 2 * 8 * 4,         # 128
    }
    forward = forward_flops_per_token(cfg, seq_len)
    # M 1488; *: projections 2*8*(8 + 2*4) + 2*8*8 = 384, scores and scores_v 2*2*4*6/2 = 48 each -> 480
    # -: 2*(8*16 + 16*8) = 512; LM head 2*8*10 = 160
    assert forward == {"M": 1488, "*": 480, "-": 512, "lm_head": 160, "total": 2640}
    assert training_flops_per_token(cfg, seq_len)["total"] == 3 * 2640


def test_structured_mlp_flops_follow_their_parameters():
    dense = ModelConfig(pattern="M--", d_model=64, vocab_size=300)
    lowrank = ModelConfig(pattern="M--", d_model=64, vocab_size=300, mlp=MLPConfig(structure="lowrank", rank=16))
    d_ff = dense.mlp.resolved_d_ff(64)
    saved = 2 * 3 * (64 * d_ff - (64 + d_ff) * 16)  # the second MLP is structured, the first stays dense
    assert forward_flops_per_token(dense, 128)["-"] - forward_flops_per_token(lowrank, 128)["-"] == saved


def test_format_counts_names_total_and_every_block_kind():
    text = format_counts(hand_example(), seq_len=6)
    assert len(text.splitlines()) == 2
    assert "1,246" in text and "mamba2" in text and "attention" in text and "mlp" in text
    assert "7.92K" in text  # training FLOPs per token
