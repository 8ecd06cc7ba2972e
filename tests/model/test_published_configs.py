"""Published models' config.json, as transformers and Strata read them: each fixture in
fixtures/published is the file a published checkpoint ships (fixtures/published/README.md says where
each text comes from, and which could not be found exactly), cut in depth and width only where a
2-core CPU needs it (CUTS), every other field as published. With random weights, Strata's import
gives transformers' logits (fp32, 1e-5 of their scale, on the reference kernels) and its export
writes back every field the transformers class declares and every tensor bit for bit; what Strata
cannot express is refused in one line that names it."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from strata.model import hf
from strata.model.hf.config import NOT_EXPRESSIBLE
from strata.model.hybrid import HybridLM
from tests.model.test_hf import export_after_import, import_hf, save_hf_model

transformers = pytest.importorskip("transformers")

PUBLISHED = Path(__file__).parent / "fixtures" / "published"

CUTS = {
    # 52 layers of 4096 -> the first 9 (M-M-M-M*-: Mamba2, MLP and the first attention layer) of 256;
    # 128 -> 8 Mamba2 heads of 64 (8 groups, expand 2: 8 * 64 = 2 * 256); 32 -> 4 query and 8 -> 2 KV heads
    # of 128; MLP 21504 -> 512; vocabulary 131072 -> 1024
    "nemotron-h-8b-base-8k": dict(hidden_size=256, hybrid_override_pattern="M-M-M-M*-", num_hidden_layers=9,
                                  mamba_num_heads=8, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=512, vocab_size=1024),
    # 32 layers of 4096 -> the first 10 (attention at 9, the first of 9, 18, 27) of 128; 128 -> 4 Mamba2 heads
    # of 64; 32 -> 4 query and 8 -> 2 KV heads of 32 (RoPE on 16 of them); MLP 14336 -> 256; vocabulary 128000
    # -> 1024
    "bamba-9b": dict(hidden_size=128, num_hidden_layers=10, attn_layer_indices=[9], mamba_n_heads=4,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, vocab_size=1024),
    "bamba-tiny-random": {},  # published at this size: 16 wide, 2 layers, RoPE on 4 of 8 channels
    # 64 layers of 4096 -> 2 of 256; 128 -> 8 heads of 64 (8 groups, expand 2); time_step_rank is
    # hidden_size / 16 as published (unread by Mamba2), intermediate_size expand * hidden_size (unread);
    # vocabulary 32768 -> 1024
    "mamba-codestral-7b-v0.1": dict(hidden_size=256, num_heads=8, num_hidden_layers=2, time_step_rank=16,
                                    intermediate_size=512, vocab_size=1024),
}
ARCHS = {"nemotron-h-8b-base-8k": "nemotron_h", "bamba-9b": "bamba", "bamba-tiny-random": "bamba",
         "mamba-codestral-7b-v0.1": "mamba2"}
# Fields of the published files that the transformers class does not declare and no transformers code reads
# (transformers keeps them in the config it saves back): Strata's export does not carry them.
NOT_CARRIED = {
    "nemotron-h-8b-base-8k": {"attention_head_dim", "auto_map", "rms_norm_eps", "time_step_rank"},
    "bamba-9b": set(),
    "bamba-tiny-random": {"attn_rotary_emb", "mamba_dt_rank", "use_mamba_kernels"},
    "mamba-codestral-7b-v0.1": {"intermediate_size", "norm_before_gate", "rms_norm", "time_step_init_scheme",
                                "time_step_scale"},
}
SEQ = 45  # one Mamba2 chunk at every published chunk size (128, 256); test_hf.py crosses chunks


def published(name: str) -> dict:
    return json.loads((PUBLISHED / f"{name}.json").read_text())


def published_dir(name: str, path: Path, cut: bool = True) -> Path:
    """A directory holding the fixture's config.json, cut as CUTS says."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(published(name), **(CUTS[name] if cut else {})), indent=2))
    return path


@pytest.fixture(scope="module", params=list(CUTS))
def imported(request, tmp_path_factory):
    """(name, transformers' model, Strata's config and arch, state, the directory transformers saved)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    theirs = save_hf_model(transformers.AutoConfig.from_pretrained(published_dir(name, tmp / "config")), tmp / "in")
    cfg, arch, state = import_hf(tmp / "in")
    return name, theirs, cfg, arch, state, tmp


def test_every_field_but_the_cut_sizes_is_as_published():
    for name, cut in CUTS.items():
        config = published(name)
        assert set(cut) <= set(config), name  # a cut changes a published field, never adds one
        assert config["architectures"] == [hf.ARCHITECTURES[ARCHS[name]]]


def test_import_gives_transformers_logits(imported, monkeypatch):
    """Strata's import gives transformers' logits on the reference kernels, which compute what transformers
    computes (bit for bit here), and RoPE on half of each Bamba head matters. Strata's CPU
    kernels (oneDNN linears, the CPU SSD; tests/kernels/test_cpu.py holds them to the reference) sum in
    another order, which over these 9 and 10 layers moves the logits by 1e-5 to 3e-5 of their scale."""
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    name, theirs, cfg, arch, state, _ = imported
    assert arch == ARCHS[name]
    ours = HybridLM(cfg).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = theirs(ids).logits
        assert (ours(ids) - logits).abs().max().item() <= 1e-5 * max(1.0, logits.abs().max().item())
        if arch == "bamba":  # half of each head rotated, as transformers does: all of it gives other logits
            assert cfg.attention.rope_fraction == 0.5
            full = HybridLM(dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, rope_fraction=1.0)))
            full.load_state_dict(state)
            assert (full.eval()(ids) - logits).abs().max().item() > 1e-3


def test_import_then_export_writes_back_the_config_and_weights(imported):
    name, *_, tmp = imported
    written, exported = export_after_import(tmp / "in", tmp / "out")
    declared = {f.name for f in dataclasses.fields(type(hf.read_hf_config(tmp / "in")))} | {"model_type"}
    assert set(written) - set(exported) == NOT_CARRIED[name] == set(written) - declared
    assert exported == {k: v for k, v in written.items() if k not in NOT_CARRIED[name]}


def test_bamba_rotates_half_of_each_head_as_published(tmp_path):
    """Bamba-9B names no partial_rotary_factor, and the tiny model derived from it names 0.5 outside
    rope_parameters: transformers' Bamba rotates half of each head in both, and so does the import."""
    for name, rotary in (("bamba-9b", 16), ("bamba-tiny-random", 4)):
        cfg, _ = hf.model_config_from_hf(hf.read_hf_config(published_dir(name, tmp_path / name)))
        assert cfg.attention.rope_fraction == 0.5 and cfg.attention.rotary_dim(cfg.d_model) == rotary


def test_nemotron_h_8b_dt_clamp_follows_the_installed_transformers(tmp_path):
    """The published time_step_min 0.001 and no time_step_limit: transformers 5.25 clamps nothing, earlier
    releases clamp dt >= 0.001; the import clamps as the installed one does and says what the others read."""
    config = hf.read_hf_config(published_dir("nemotron-h-8b-base-8k", tmp_path))
    cfg, _ = hf.model_config_from_hf(config)
    (note,) = hf.import_notes(config)
    assert cfg.mamba.dt_limit == ([0.0, math.inf] if hf.nemotron_h_clamps_limit() else [1e-3, math.inf])
    assert ("before 5.25" if hf.nemotron_h_clamps_limit() else "5.25 and later") in note


# ----------------------------------------------------------------------------------------
# Published models Strata cannot express: refused in one line naming what it lacks
# ----------------------------------------------------------------------------------------

def test_a_published_mixture_of_experts_nemotron_h_is_refused_naming_its_layer_type(tmp_path):
    config = hf.read_hf_config(published_dir("nvidia-nemotron-3-nano-30b-a3b", tmp_path, cut=False))
    with pytest.raises(hf.UnsupportedModel, match=r"layer types \['moe'\] \(MoE\)") as e:
        hf.model_config_from_hf(config)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model_type", sorted(NOT_EXPRESSIBLE))
def test_other_hybrid_classes_are_refused_naming_what_they_have(model_type, tmp_path):
    """transformers' other hybrids, with the class's own defaults (the published model's, per its docs)."""
    transformers.AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    with pytest.raises(hf.UnsupportedModel) as e:
        hf.read_hf_config(tmp_path)
    message = str(e.value)
    assert "\n" not in message and f"model_type {model_type!r}" in message and NOT_EXPRESSIBLE[model_type] in message
