"""Structured linears: the paper's parameter counts, their inits, the exact dense
equivalent (pre-merge, export), the config's derived sizes and its error messages."""
import pytest
import torch
import torch.nn.functional as F

from strata.model.config import MLPConfig, ModelConfig
from strata.model.hybrid import HybridLM
from strata.model.structured import (BlockDense, BlockShuffle, LowRank, StructuredLinear, count_params,
                                     premerge_where_faster, to_dense)

SHAPES = [(64, 256), (256, 64), (96, 96)]


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("rank", [8, 32])
def test_lowrank_params_are_n_plus_m_times_r(n, m, rank):
    assert count_params(LowRank(n, m, rank)) == (n + m) * rank


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("rank,nblocks", [(32, 4), (48, 2), (16, 16)])
def test_blockdense_params_are_r_times_m_plus_n_over_b(n, m, rank, nblocks):
    assert count_params(BlockDense(n, m, rank, nblocks)) == rank * (m + n // nblocks)


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("nblocks", [1, 2, 4, 8])
def test_blockshuffle_params_are_min_times_sum_over_b(n, m, nblocks):
    assert count_params(BlockShuffle(n, m, nblocks)) == min(n, m) * (n + m) // nblocks


def make(kind, n, m, bias=True):
    return {"lowrank": lambda: LowRank(n, m, 12, bias),
            "blockdense": lambda: BlockDense(n, m, 24, 4, bias),
            "blockshuffle": lambda: BlockShuffle(n, m, 4, bias)}[kind]()


@pytest.mark.parametrize("kind", ["lowrank", "blockdense", "blockshuffle"])
@pytest.mark.parametrize("n,m", SHAPES)
def test_dense_weight_computes_the_structured_output(kind, n, m):
    torch.manual_seed(0)
    layer = make(kind, n, m).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 7, n, dtype=torch.float64)
    expected = layer(x)
    torch.testing.assert_close(F.linear(x, layer.dense_weight(), layer.bias), expected, rtol=1e-10, atol=1e-10)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert "merged" not in layer.state_dict()  # pre-merge is a cache, never checkpointed


def stride_shuffle_matrix(nblocks, width):
    """P with (P h)[j * nblocks + i] = h[i * (width // nblocks) + j]: block i's output j."""
    per = width // nblocks
    p = torch.zeros(width, width, dtype=torch.float64)
    for i in range(nblocks):
        for j in range(per):
            p[j * nblocks + i, i * per + j] = 1.0
    return p


@pytest.mark.parametrize("n,m", SHAPES)
def test_blockshuffle_is_blockdiag_shuffle_blockdiag(n, m):
    layer = BlockShuffle(n, m, 4).double()
    expected = (torch.block_diag(*layer.blocks2.unbind(0)) @ stride_shuffle_matrix(4, min(n, m))
                @ torch.block_diag(*layer.blocks1.unbind(0)))
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-12, atol=1e-12)


def test_lowrank_init_is_the_balanced_truncated_svd_of_a_dense_draw():
    n, m, rank, std = 48, 80, 10, 0.02
    torch.manual_seed(3)
    dense = torch.randn(m, n) * std
    torch.manual_seed(3)
    layer = LowRank(n, m, rank, std=std)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    torch.testing.assert_close(layer.U @ layer.V, (u[:, :rank] * s[:rank]) @ vh[:rank], rtol=1e-4, atol=1e-6)
    # U = U_r S^1/2 and V = S^1/2 V_r^T: both factors carry the same singular values
    torch.testing.assert_close(layer.U.T @ layer.U, torch.diag(s[:rank]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.V @ layer.V.T, torch.diag(s[:rank]), rtol=1e-4, atol=1e-6)


def assert_orthonormal(w):
    rows, cols = w.shape[-2:]
    gram = w @ w.transpose(-1, -2) if rows <= cols else w.transpose(-1, -2) @ w
    torch.testing.assert_close(gram, torch.eye(min(rows, cols)).expand_as(gram), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,m", SHAPES)
def test_block_structures_start_orthonormal(n, m):
    dense = BlockDense(n, m, 32, 4)
    shuffle = BlockShuffle(n, m, 4)
    for w in (dense.blocks, dense.U, shuffle.blocks1, shuffle.blocks2):
        assert_orthonormal(w)


def tiny_cfg(**mlp) -> ModelConfig:
    cfg = ModelConfig(pattern="-M-*-", d_model=64, vocab_size=97, max_seq_len=64,
                      mlp=MLPConfig(activation="relu2", **mlp))
    cfg.mamba.headdim = 16
    cfg.attention.n_heads = 4
    cfg.validate()
    return cfg


@pytest.mark.parametrize("structure,fraction", [("lowrank", 0.32), ("lowrank", 0.63), ("blockdense", 0.32),
                                                ("blockshuffle", 0.32), ("blockshuffle", 0.63)])
def test_model_mlps_reach_the_target_fraction_and_keep_the_first_dense(structure, fraction):
    cfg = tiny_cfg(structure=structure, param_fraction=fraction, nblocks=2 if structure == "blockdense" else 0)
    model = HybridLM(cfg)
    mlps = [b.mixer for b in model.blocks if b.kind == "-"]
    dense_params = 2 * 64 * 256
    assert isinstance(mlps[0].up_proj, torch.nn.Linear)  # dense_first_layer (the paper's choice)
    for mlp in mlps[1:]:
        assert isinstance(mlp.up_proj, StructuredLinear) and isinstance(mlp.down_proj, StructuredLinear)
        share = (count_params(mlp.up_proj) + count_params(mlp.down_proj)) / dense_params
        assert share == pytest.approx(cfg.mlp.structured_sizes(64).fraction)
        assert abs(share - fraction) <= 0.01


@pytest.mark.parametrize("width", [1024, 2048, 4096, 5120])
@pytest.mark.parametrize("fraction", [0.32, 0.63])
def test_derived_ranks_keep_gpu_friendly_widths(width, fraction):
    # an odd rank (e.g. 1311 at width 5120) made LowRank slower than dense on an H100
    lowrank = MLPConfig(activation="relu2", structure="lowrank", param_fraction=fraction).structured_sizes(width)
    blockdense = MLPConfig(activation="relu2", structure="blockdense", param_fraction=fraction).structured_sizes(width)
    assert lowrank.rank % 64 == 0 and (blockdense.rank // blockdense.nblocks) % 8 == 0
    assert abs(lowrank.fraction - fraction) <= 0.01 and abs(blockdense.fraction - fraction) <= 0.01


def test_all_mlps_structured_when_dense_first_layer_is_off():
    model = HybridLM(tiny_cfg(structure="lowrank", rank=8, dense_first_layer=False))
    assert all(isinstance(b.mixer.up_proj, LowRank) for b in model.blocks if b.kind == "-")


def test_model_init_scales_the_residual_output_factor():
    torch.manual_seed(0)
    model = HybridLM(tiny_cfg(structure="lowrank", rank=16, dense_first_layer=False))
    mlp = model.blocks[0].mixer
    # up (64 -> 256) and down (256 -> 64) truncate transposed draws alike, so their stds differ
    # by the model's residual scaling 1 / sqrt(2 * n_blocks) alone
    ratio = mlp.down_proj.dense_weight().std() / mlp.up_proj.dense_weight().std()
    assert ratio.item() == pytest.approx((2 * len(model.blocks)) ** -0.5, rel=0.1)


def test_to_dense_exports_a_model_computing_the_same_logits():
    torch.manual_seed(0)
    cfg = tiny_cfg(structure="blockshuffle", param_fraction=0.32)
    model = HybridLM(cfg).double().eval()
    ids = torch.randint(0, 97, (2, 16))
    before = model(ids)
    to_dense(model)
    assert not any(isinstance(m, StructuredLinear) for m in model.modules())
    torch.testing.assert_close(model(ids), before, rtol=1e-10, atol=1e-10)
    dense_cfg = tiny_cfg()  # the exported state loads into a dense-MLP model of the same shape
    HybridLM(dense_cfg).double().load_state_dict(model.state_dict())


def test_premerge_follows_the_measured_speed_and_keeps_outputs():
    torch.manual_seed(0)
    model = HybridLM(tiny_cfg(structure="lowrank", rank=8, dense_first_layer=False)).eval()
    ids = torch.randint(0, 97, (1, 5))
    before = model(ids)
    report = premerge_where_faster(model, tokens=1, repeats=3)
    assert report, "every distinct structured shape is measured"
    for m in model.modules():
        if isinstance(m, StructuredLinear):
            key = f"{type(m).__name__}({m.extra_repr()})"
            structured_s, dense_s, merged = report[key]
            assert merged == (dense_s < structured_s) == (m.merged is not None)
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_a_merge_for_few_tokens_leaves_longer_inputs_structured():
    layer = LowRank(32, 48, 4).double()
    layer.merge(max_rows=1)
    spy = []
    layer.structured_forward = lambda x, f=layer.structured_forward: spy.append(x.shape) or f(x)
    one, prompt = torch.randn(1, 1, 32, dtype=torch.float64), torch.randn(1, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(one), F.linear(one, layer.dense_weight()))
    torch.testing.assert_close(layer(prompt), F.linear(prompt, layer.dense_weight()))
    assert spy == [prompt.shape]  # the prompt took the structured path, the token the merged one


@pytest.mark.parametrize("overrides,message", [
    (dict(structure="blockshuffle", param_fraction=0.5),
     "mlp.param_fraction: 0.5 is not reachable by blockshuffle at d_model=64, d_ff=256; "
     "nearest valid: 0.3125 (nblocks=4) or 0.625 (nblocks=2)"),
    (dict(structure="blockdense", rank=32, nblocks=3),
     "mlp.nblocks: 3 does not divide d_model=64 and d_ff=256; nearest valid: 2 or 4"),
    (dict(structure="blockshuffle", nblocks=6),
     "mlp.nblocks: 6 does not divide d_model=64 and d_ff=256; nearest valid: 4 or 8"),
    (dict(structure="blockdense", rank=30, nblocks=4),
     "mlp.rank: 30 is not a positive multiple of nblocks=4; nearest valid: 28 or 32"),
    (dict(structure="lowrank", param_fraction=0.001),
     "mlp.param_fraction: 0.001 is not reachable by lowrank at these widths; nearest valid: 0.01953 (rank=1)"),
    (dict(structure="blockdense", param_fraction=0.32),
     "mlp.param_fraction: 0.32 is not reachable by blockdense at these widths; "
     "nearest valid: 0.293 (rank=24, nblocks=4) or 0.3418 (rank=28, nblocks=4)"),
    (dict(structure="lowrank"), "mlp.rank: lowrank needs rank >= 1 or param_fraction > 0"),
    (dict(rank=8), "mlp.rank: set, but structure is 'dense'; choose one of 'lowrank', 'blockdense', "
                   "'blockshuffle' or unset it"),
])
def test_bad_sizes_give_one_line_naming_the_nearest_valid_values(overrides, message):
    with pytest.raises(ValueError) as err:
        tiny_cfg(**overrides)
    assert str(err.value) == message
    assert "\n" not in str(err.value)
