"""Parameter names: Strata's state dict <-> each HF target's."""
from __future__ import annotations

import torch

from strata.model.config import ModelConfig
from strata.model.hf.config import UnsupportedModel, require

# ----------------------------------------------------------------------------------------
# Parameter names
# ----------------------------------------------------------------------------------------

def name_prefixes(cfg: ModelConfig, arch: str) -> list[tuple[str, str]]:
    """(Strata prefix, HF prefix) pairs; a parameter's name is its prefix plus the same suffix on both sides."""
    if arch == "bamba":
        pairs = [("embed.", "model.embed_tokens."), ("final_norm.", "model.final_layernorm.")]
        for i, kind in enumerate(cfg.pattern):
            layer = f"model.layers.{i // 2}."
            norm, mixer = {"-": ("pre_ff_layernorm.", "feed_forward."), "M": ("input_layernorm.", "mamba."),
                           "*": ("input_layernorm.", "self_attn.")}[kind]
            pairs += [(f"blocks.{i}.norm.", layer + norm), (f"blocks.{i}.mixer.", layer + mixer)]
    else:
        base = "backbone."  # NemotronH too: transformers keeps "model." in memory but reads and writes "backbone."
        pairs = [("embed.", base + "embeddings."), ("final_norm.", base + "norm_f.")]
        pairs += [(f"blocks.{i}.", f"{base}layers.{i}.") for i in range(len(cfg.pattern))]
    return pairs + [("lm_head.", "lm_head.")]


def _rename(name: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Strata names -> HF names (no copies except where HF needs a tensor Strata shares)."""
    pairs = name_prefixes(cfg, arch)
    out = {}
    for name, tensor in state_dict.items():
        hf_name = _rename(name, pairs)
        if hf_name is None:
            raise UnsupportedModel(f"parameter {name!r} has no place in {arch}; is the checkpoint from this config?")
        out[hf_name] = tensor
    if cfg.tie_embeddings and arch == "nemotron_h":
        out["lm_head.weight"] = state_dict["embed.weight"].clone()  # HF NemotronH never ties
    if arch == "bamba" and cfg.attention.qkv_bias:
        for i in range(1, len(cfg.pattern), 2):
            if cfg.pattern[i - 1] == "*":
                out[f"model.layers.{i // 2}.self_attn.o_proj.bias"] = torch.zeros(
                    cfg.d_model, dtype=state_dict["embed.weight"].dtype)
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """HF names -> Strata names. Refuses what Strata cannot hold (non-zero Bamba o_proj bias)."""
    pairs = [(dst, src) for src, dst in name_prefixes(cfg, arch)]
    if arch == "nemotron_h":  # transformers' in-memory names, should a directory hold them
        pairs += [("model." + dst[len("backbone."):], src) for dst, src in pairs if dst.startswith("backbone.")]
    if arch == "mamba2":  # mamba_ssm's names, which HF's Mamba2 load hook also accepts
        pairs += [("backbone.embedding.", "embed.")]
    out = {}
    for name, tensor in hf_state.items():
        if arch == "bamba" and name.endswith("self_attn.o_proj.bias"):
            require(not tensor.any(), f"bamba: {name} is non-zero; Strata's attention has no output bias")
            continue
        if arch == "nemotron_h" and name.startswith("mtp."):
            continue  # multi-token-prediction heads: HF ignores them too
        strata_name = _rename(name, pairs)
        require(strata_name is not None, f"{arch}: weight {name!r} has no place in Strata's model")
        out[strata_name] = tensor
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out
