"""Strata's model against transformers' independent NemotronH, Mamba2 and Bamba (fp32, CPU,
their PyTorch paths): export gives the same logits and loss, import gives the same logits,
import-then-export returns the weights bit for bit, and what a target cannot express is refused."""
import dataclasses
import json
import math

import pytest
import torch

from strata.model import hf
from strata.model.config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig
from strata.model.hybrid import HybridLM

transformers = pytest.importorskip("transformers")

VOCAB = 97


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    """A Strata model whose norms, D, biases and tied/untied head are all non-trivial, so that any
    misplaced weight, eps or convention shows in the logits."""
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".D"):
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("bias") and "dt_bias" not in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("weight") and p.dim() == 2:
                p.mul_(3.0)  # larger activations: attention scores and gates far from linear
            elif name.endswith("dt_bias"):  # dt from ~1e-4 to ~2 across heads: a dt_limit bites
                p.copy_(torch.linspace(-9.0, 2.0, p.numel()))
    return model


def export_to_hf(model: HybridLM, arch: str, tmp_path):
    """Through the files: config.json + safetensors, loaded by from_pretrained."""
    cfg = model.cfg
    config = hf.build_hf_config(cfg, arch, {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0})
    config.save_pretrained(tmp_path)
    hf.save_weights(tmp_path, hf.to_hf_state_dict(model.state_dict(), cfg, arch))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded).__name__ == hf.ARCHITECTURES[arch]
    return loaded


def strata_loss(model, ids):
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    return model(ids, labels=labels)


CASES = {
    # name: (arch, config, sequence length); lengths are not multiples of the chunk size
    "nemotron_h-groups2-state16-gqa-tied": ("nemotron_h", ModelConfig(
        pattern="M*-M-*", d_model=64, vocab_size=VOCAB, tie_embeddings=True,
        mamba=MambaConfig(d_state=16, headdim=32, ngroups=2, chunk_size=16),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, rope=False), mlp=MLPConfig(activation="relu2")), 37),
    "nemotron_h-groups1-state128-headdim64-mha-untied": ("nemotron_h", ModelConfig(
        pattern="MM*-", d_model=64, vocab_size=VOCAB, tie_embeddings=False, norm_eps=1e-6,
        mamba=MambaConfig(d_state=128, headdim=64, ngroups=1, chunk_size=16, conv_bias=False, proj_bias=True),
        attention=AttentionConfig(n_heads=2, head_dim=24, rope=False),
        mlp=MLPConfig(activation="relu2", d_ff=96, bias=True)), 50),
    "mamba2-groups4-state128-headdim32-tied": ("mamba2", ModelConfig(
        pattern="MMM", d_model=64, vocab_size=VOCAB, tie_embeddings=True,
        mamba=MambaConfig(d_state=128, headdim=32, ngroups=4, chunk_size=8)), 45),
    "mamba2-groups1-state16-headdim64-untied": ("mamba2", ModelConfig(
        pattern="MM", d_model=64, vocab_size=VOCAB, tie_embeddings=False,
        mamba=MambaConfig(d_state=16, headdim=64, ngroups=1, chunk_size=16, proj_bias=True)), 21),
    "bamba-groups2-gqa-qkvbias-untied": ("bamba", ModelConfig(
        pattern="M-*-M-", d_model=64, vocab_size=VOCAB, tie_embeddings=False,
        mamba=MambaConfig(d_state=16, headdim=32, ngroups=2, chunk_size=16),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=True), mlp=MLPConfig(d_ff=128)), 40),
    "bamba-state128-headdim64-mha-tied": ("bamba", ModelConfig(
        pattern="*-M-", d_model=64, vocab_size=VOCAB, tie_embeddings=True,
        mamba=MambaConfig(d_state=128, headdim=64, chunk_size=8),
        attention=AttentionConfig(n_heads=4, head_dim=32, rope_theta=500.0), mlp=MLPConfig(bias=True)), 19),
    "bamba-partial-rope-gqa": ("bamba", ModelConfig(  # RoPE on the first 8 of each head's 16 channels, as Bamba-9B
        pattern="*-M-*-", d_model=64, vocab_size=VOCAB, tie_embeddings=False,
        mamba=MambaConfig(d_state=16, headdim=32, chunk_size=16),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, rope_fraction=0.5), mlp=MLPConfig(d_ff=128)), 33),
    # dt limits: NemotronH's lower one (time_step_min), Mamba2's and Bamba's time_step_limit
    "nemotron_h-dt_limit-time_step_min": ("nemotron_h", ModelConfig(
        pattern="M-M*", d_model=64, vocab_size=VOCAB, tie_embeddings=False,
        mamba=MambaConfig(d_state=16, headdim=16, ngroups=2, chunk_size=16, dt_limit=[1e-3, math.inf]),
        attention=AttentionConfig(n_heads=4, rope=False), mlp=MLPConfig(activation="relu2")), 43),
    "mamba2-dt_limit-upper-residual_in_fp32": ("mamba2", ModelConfig(
        pattern="MM", d_model=64, vocab_size=VOCAB, residual_in_fp32=True,
        mamba=MambaConfig(d_state=16, headdim=16, chunk_size=8, dt_limit=[0.0, 0.3])), 30),
    "bamba-dt_limit-both": ("bamba", ModelConfig(
        pattern="M-*-", d_model=64, vocab_size=VOCAB, tie_embeddings=False,
        mamba=MambaConfig(d_state=16, headdim=32, chunk_size=16, dt_limit=[2e-3, 0.3]),
        attention=AttentionConfig(n_heads=4), mlp=MLPConfig(d_ff=128)), 35),
}


@pytest.mark.parametrize("name", list(CASES))
def test_exported_model_gives_strata_logits_and_loss_in_transformers(name, tmp_path):
    arch, cfg, seqlen = CASES[name]
    cfg.validate()
    assert hf.choose_arch(cfg) == arch
    model = perturbed_model(cfg)
    theirs = export_to_hf(model, arch, tmp_path)
    ids = torch.randint(0, VOCAB, (2, seqlen), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = model(ids)
        out = theirs(ids, labels=ids)
        assert out.logits.shape == ours_logits.shape
        assert (out.logits - ours_logits).abs().max().item() <= 1e-4
        assert out.loss.item() == pytest.approx(strata_loss(model, ids).item(), abs=1e-5)


def test_exported_dt_limits_bite():
    """The dt_limit cases above would pass without a clamp if no dt reached the limits."""
    for name in [n for n in CASES if "dt_limit" in n]:
        _, cfg, seqlen = CASES[name]
        model = perturbed_model(cfg)
        free = HybridLM(dataclasses.replace(cfg, mamba=dataclasses.replace(cfg.mamba, dt_limit=[0.0, math.inf])))
        free.load_state_dict(model.state_dict())
        ids = torch.randint(0, VOCAB, (2, seqlen), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert (free.eval()(ids) - model(ids)).abs().max().item() > 1e-3, name


NEMOTRON_BOTH_LIMITS = ModelConfig(
    pattern="M-M*", d_model=64, vocab_size=VOCAB, tie_embeddings=False,
    mamba=MambaConfig(d_state=16, headdim=16, ngroups=2, chunk_size=16, dt_min=0.01, dt_limit=[0.01, 0.08]),
    attention=AttentionConfig(n_heads=4, rope=False), mlp=MLPConfig(activation="relu2"))


def test_a_nemotron_h_dt_limit_with_both_ends_is_written_where_the_installed_transformers_clamps_both(tmp_path):
    """transformers 5.25 clamps NemotronH's dt to time_step_limit, so both ends can be written; before,
    it clamps from below only, and an upper limit is refused naming the installed release."""
    if not hf.nemotron_h_clamps_limit():
        with pytest.raises(hf.UnsupportedModel, match=r"dt_limit=\[0.01, 0.08\] has an upper bound.*5\.25"):
            hf.choose_arch(NEMOTRON_BOTH_LIMITS, "nemotron_h")
        return
    model = perturbed_model(NEMOTRON_BOTH_LIMITS)
    theirs = export_to_hf(model, "nemotron_h", tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["time_step_limit"] == [0.01, 0.08] and written["time_step_min"] == 0.01
    ids = torch.randint(0, VOCAB, (2, 43), generator=torch.Generator().manual_seed(1))
    free = HybridLM(dataclasses.replace(NEMOTRON_BOTH_LIMITS, mamba=dataclasses.replace(
        NEMOTRON_BOTH_LIMITS.mamba, dt_limit=[0.0, math.inf])))
    free.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-5
        assert (free.eval()(ids) - model(ids)).abs().max().item() > 1e-3  # both ends bite


def test_a_nemotron_h_export_names_the_clamp_other_transformers_releases_would_read():
    (note,) = hf.export_notes(NEMOTRON_BOTH_LIMITS, "nemotron_h") if hf.nemotron_h_clamps_limit() else \
        hf.export_notes(CASES["nemotron_h-dt_limit-time_step_min"][1], "nemotron_h")
    if hf.nemotron_h_clamps_limit():  # time_step_min 0.01 is what releases before 5.25 clamp at
        assert "[0.01, 0.08]" in note and "before 5.25" in note and "[0.01, inf]" in note
    else:  # time_step_limit [0, inf], which 5.25 reads as no clamp at all
        assert "[0.001, inf]" in note and "5.25 and later" in note and "[0.0, inf]" in note
    same = dataclasses.replace(NEMOTRON_BOTH_LIMITS, mamba=dataclasses.replace(
        NEMOTRON_BOTH_LIMITS.mamba, dt_min=1e-3, dt_limit=[0.0, math.inf] if not hf.nemotron_h_clamps_limit()
        else [1e-3, math.inf]))
    assert hf.export_notes(same, "nemotron_h") == []  # every release reads this one alike


def test_residual_in_fp32_cannot_be_written_as_bamba():
    fp32 = ModelConfig(pattern="M-*-", vocab_size=VOCAB, residual_in_fp32=True)
    with pytest.raises(hf.UnsupportedModel, match="residual_in_fp32"):
        hf.choose_arch(fp32, "bamba")


def test_residual_in_fp32_keeps_an_fp32_residual_stream_under_low_precision_weights():
    cfg = ModelConfig(pattern="M-*-", d_model=64, vocab_size=VOCAB, mamba=MambaConfig(d_state=16, headdim=16),
                      attention=AttentionConfig(n_heads=4))
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    for residual_in_fp32, stream in ((True, torch.float32), (False, torch.bfloat16)):
        torch.manual_seed(0)
        model = HybridLM(dataclasses.replace(cfg, residual_in_fp32=residual_in_fp32)).to(torch.bfloat16).eval()
        dtypes = []
        for block in model.blocks:
            block.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        with torch.no_grad():
            assert model(ids).dtype == torch.bfloat16
        assert dtypes == [stream] * len(cfg.pattern)


def test_nemotron_h_export_of_a_tied_model_writes_the_head_as_a_copy():
    _, cfg, _ = CASES["nemotron_h-groups2-state16-gqa-tied"]
    state = perturbed_model(cfg).state_dict()
    out = hf.to_hf_state_dict(state, cfg, "nemotron_h")
    assert torch.equal(out["lm_head.weight"], state["embed.weight"])
    assert out["lm_head.weight"].data_ptr() != state["embed.weight"].data_ptr()  # safetensors refuses shared storage


# ----------------------------------------------------------------------------------------
# Import: an HF model initialised by transformers itself
# ----------------------------------------------------------------------------------------

NEMOTRON_H = dict(model_type="nemotron_h", vocab_size=VOCAB, hidden_size=64,
                  layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                  ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=32, n_groups=2, chunk_size=16,
                  tie_word_embeddings=False)

HF_MODELS = {
    # NemotronH with its defaults: time_step_min = 1e-3 and time_step_limit = (0, inf), so transformers clamps
    # dt >= 1e-3 before 5.25 and not at all from 5.25 on
    "nemotron_h": NEMOTRON_H,
    "nemotron_h-time_step_limit": dict(NEMOTRON_H, time_step_limit=(0.01, 0.08)),  # both ends bite from 5.25
    "nemotron_h-time_step_min": dict(NEMOTRON_H, time_step_min=0.01),  # bites before 5.25
    # Mamba2 with its defaults: residual_in_fp32 = true, time_step_limit = (0, inf)
    "mamba2": dict(model_type="mamba2", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_heads=4,
                   head_dim=32, state_size=16, n_groups=2, chunk_size=16, tie_word_embeddings=True),
    "mamba2-time_step_limit": dict(model_type="mamba2", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                   num_heads=4, head_dim=32, state_size=16, n_groups=1, chunk_size=8,
                                   time_step_limit=(0.0, 0.3), residual_in_fp32=False, tie_word_embeddings=False),
    "bamba-time_step_limit": dict(model_type="bamba", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  attn_layer_indices=[1], num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=128, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=2,
                                  mamba_d_state=16, mamba_chunk_size=16, time_step_limit=(2e-3, 0.3),
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 1.0}, tie_word_embeddings=False),
    # Bamba with its config class's own RoPE: partial_rotary_factor 0.5 (the first 8 of each head's 16 channels)
    "bamba-partial_rotary_factor": dict(model_type="bamba", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3,
                                        attn_layer_indices=[0, 2], num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=96, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=2,
                                        mamba_d_state=16, mamba_chunk_size=16, tie_word_embeddings=False),
}


def hf_model_dir(kind: str, tmp_path):
    kwargs = dict(HF_MODELS[kind])
    return save_hf_model(transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs), tmp_path)


def save_hf_model(config, tmp_path):
    """transformers' model of `config`, initialised by transformers and perturbed, saved to tmp_path."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # published: bf16
    with torch.no_grad():  # activations far from transformers' near-zero init, so that every convention shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("dt_bias"):  # dt from ~1e-4 to ~2 across heads: every limit above bites
                p.copy_(torch.linspace(-9.0, 2.0, p.numel()))
            elif name.endswith("conv1d.weight"):
                p.normal_(0.0, 0.5)
            elif p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(tmp_path)
    return model


def import_hf(path):
    hf_config = hf.read_hf_config(path)
    cfg, arch = hf.model_config_from_hf(hf_config)
    state = hf.from_hf_state_dict(hf.load_weights(path), cfg, arch)
    return cfg, arch, state


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_imported_hf_model_gives_transformers_logits(kind, tmp_path):
    theirs = hf_model_dir(kind, tmp_path)
    cfg, arch, state = import_hf(tmp_path)
    assert arch == kind.split("-")[0]
    ours = HybridLM(cfg).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = theirs(ids).logits  # fp32: within 1e-5 of logits of size 1 (the Mamba2 default's reach 10)
        assert (ours(ids) - logits).abs().max().item() <= 1e-5 * max(1.0, logits.abs().max().item())
        if cfg.mamba.dt_limit != [0.0, math.inf]:  # the clamp bites: without it the logits differ
            free = dataclasses.replace(cfg.mamba, dt_limit=[0.0, math.inf])
            unclamped = HybridLM(dataclasses.replace(cfg, mamba=free))
            unclamped.load_state_dict(state)
            assert (unclamped.eval()(ids) - theirs(ids).logits).abs().max().item() > 1e-3


def test_imported_limits_and_residual_in_fp32_are_transformers_own():
    by_limit = hf.nemotron_h_clamps_limit()  # transformers 5.25 and later: NemotronH clamps to time_step_limit
    expected = {"nemotron_h": ([0.0, math.inf] if by_limit else [1e-3, math.inf], False),
                "nemotron_h-time_step_limit": ([0.01, 0.08] if by_limit else [1e-3, math.inf], False),
                "nemotron_h-time_step_min": ([0.0, math.inf] if by_limit else [0.01, math.inf], False),
                "mamba2": ([0.0, math.inf], True),
                "mamba2-time_step_limit": ([0.0, 0.3], False), "bamba-time_step_limit": ([2e-3, 0.3], False)}
    for kind, (limit, residual_in_fp32) in expected.items():
        kwargs = dict(HF_MODELS[kind])
        cfg, _ = hf.model_config_from_hf(transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
        assert cfg.mamba.dt_limit == limit and cfg.residual_in_fp32 is residual_in_fp32, kind


def export_after_import(hf_dir, out_dir) -> tuple[dict, dict]:
    """Import hf_dir and export it to out_dir; checks that every tensor comes back bit for bit and returns
    (hf_dir's config.json, out_dir's), as dicts."""
    original = hf.load_weights(hf_dir)
    cfg, arch, state = import_hf(hf_dir)
    back = hf.to_hf_state_dict(state, cfg, arch)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    written = json.loads((hf_dir / "config.json").read_text())
    ids = {k: written[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    hf.build_hf_config(cfg, arch, ids).save_pretrained(out_dir)
    return written, json.loads((out_dir / "config.json").read_text())


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_import_then_export_returns_the_config_and_weights_exactly(kind, tmp_path):
    hf_model_dir(kind, tmp_path / "in")
    written, back = export_after_import(tmp_path / "in", tmp_path / "out")
    if kind == "nemotron_h-time_step_limit" and not hf.nemotron_h_clamps_limit():
        # before 5.25 transformers reads no path of time_step_limit: the import says so and drops it
        assert list(hf.read_hf_config(tmp_path / "out").time_step_limit) == [0.0, math.inf]
        assert "time_step_limit" in hf.import_notes(hf.read_hf_config(tmp_path / "in"))[0]
        back.pop("time_step_limit"), written.pop("time_step_limit")
    assert back == written


def test_a_nemotron_h_clamp_other_transformers_releases_read_differently_is_named_on_import():
    config = transformers.AutoConfig.for_model(**dict(NEMOTRON_H, time_step_limit=(0.0, 0.1)))
    (note,) = hf.import_notes(config)
    limit = hf.model_config_from_hf(config)[0].mamba.dt_limit
    if hf.nemotron_h_clamps_limit():  # Strata clamps as 5.25 does; releases before clamp at time_step_min
        assert limit == [0.0, 0.1] and "before 5.25" in note and "[0.001, inf]" in note
    else:
        assert limit == [1e-3, math.inf] and "5.25 and later" in note and "[0.0, 0.1]" in note
    alike = transformers.AutoConfig.for_model(**dict(NEMOTRON_H, time_step_min=0.01, time_step_limit=(0.01, math.inf)))
    assert hf.import_notes(alike) == []  # [0.01, inf] in every release


def test_config_round_trips_through_the_hf_config():
    for name, (arch, cfg, _) in CASES.items():
        config = hf.build_hf_config(cfg, arch)
        back, back_arch = hf.model_config_from_hf(config)
        assert back_arch == arch
        for field in ("pattern", "d_model", "vocab_size", "norm_eps", "residual_in_fp32", "mamba"):
            if field == "mamba" and "M" not in cfg.pattern:
                continue
            assert getattr(back, field) == getattr(cfg, field), (name, field)


# ----------------------------------------------------------------------------------------
# What cannot be expressed is refused, with one line naming the feature and what would work
# ----------------------------------------------------------------------------------------

def test_rope_attention_is_refused_for_nemotron_h_with_bamba_suggested():
    cfg = ModelConfig(pattern="M-*-", vocab_size=VOCAB, attention=AttentionConfig(rope=True))
    with pytest.raises(hf.UnsupportedModel) as e:
        hf.choose_arch(cfg, "nemotron_h")
    message = str(e.value)
    assert "\n" not in message and "RoPE" in message and "--arch bamba" in message


def test_a_model_no_target_can_express_is_refused_naming_each_reason():
    cfg = ModelConfig(pattern="MM-*", vocab_size=VOCAB, attention=AttentionConfig(rope=True))  # swiglu, not pairs
    with pytest.raises(hf.UnsupportedModel) as e:
        hf.choose_arch(cfg)
    message = str(e.value)
    assert "\n" not in message and all(a in message for a in hf.ARCHS)


def test_auto_picks_a_target_that_fits():
    assert hf.choose_arch(ModelConfig(pattern="MMMM", vocab_size=VOCAB)) == "mamba2"
    assert hf.choose_arch(ModelConfig(pattern="M-*-", vocab_size=VOCAB)) == "bamba"
    relu2 = ModelConfig(pattern="M*-", vocab_size=VOCAB, attention=AttentionConfig(rope=False),
                        mlp=MLPConfig(activation="relu2"))
    assert hf.choose_arch(relu2) == "nemotron_h"


def test_hf_features_strata_cannot_express_are_refused_on_import():
    odd_rope = transformers.AutoConfig.for_model(
        "bamba", hidden_size=64, mamba_n_heads=4, num_attention_heads=4, num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1875})
    with pytest.raises(hf.UnsupportedModel, match=r"partial_rotary_factor=0.1875 rotates 3 of each head's 16") as e:
        hf.model_config_from_hf(odd_rope)
    assert "\n" not in str(e.value)
    moe = transformers.AutoConfig.for_model("nemotron_h", hidden_size=64, layers_block_type=["linear_attention", "moe"],
                                            mamba_num_heads=4, mamba_head_dim=32)
    with pytest.raises(hf.UnsupportedModel, match="MoE"):
        hf.model_config_from_hf(moe)
    odd_width = transformers.AutoConfig.for_model("nemotron_h", hidden_size=64, layers_block_type=["linear_attention"],
                                                  mamba_num_heads=3, mamba_head_dim=32)
    with pytest.raises(hf.UnsupportedModel, match="expand"):
        hf.model_config_from_hf(odd_width)
