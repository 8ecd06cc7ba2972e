"""What each HF target can express of a Strata model, and the config mapping both ways
(transformers' config objects are read by attribute; model/hf/files.py builds them)."""
from __future__ import annotations

import functools
import importlib.metadata
import math

from strata.model.config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig

NO_CLAMP_TIME_STEP_MIN = 1e-30
ARCHS = ("mamba2", "nemotron_h", "bamba")
"""In the order --arch auto tries them: the most specific class first."""
ARCHITECTURES = {"nemotron_h": "NemotronHForCausalLM", "mamba2": "Mamba2ForCausalLM", "bamba": "BambaForCausalLM"}
NEMOTRON_LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
_MAMBA1 = "Mamba1 mixers (x_proj and dt_proj around a selective scan), not Mamba2's SSD"
NOT_EXPRESSIBLE = {
    "mamba": _MAMBA1,
    "falcon_mamba": _MAMBA1,
    "jamba": f"{_MAMBA1}, and mixture-of-experts MLPs",
    "zamba": f"{_MAMBA1}, and one attention block shared across depth, fed [hidden, embedding]",
    "zamba2": "attention blocks shared across depth, fed [hidden, embedding] and adapted per use by LoRA",
    "falcon_h1": "attention and Mamba2 side by side in every layer (their outputs summed), under muP multipliers",
    "granitemoehybrid": "embedding, attention, residual and logits multipliers (muP), and mixture-of-experts MLPs "
                        "unless num_local_experts is 0",
    "lfm2": "gated short convolutions, not Mamba2",
    "qwen3_next": "gated DeltaNet linear attention, not Mamba2, and mixture-of-experts MLPs",
}
"""transformers' other hybrid (and SSM) classes, and what in each Strata's model cannot express."""


def unsupported_type(model_type) -> str:
    """Why import refuses `model_type`, naming what the class has where it is a hybrid we know."""
    reason = f" ({NOT_EXPRESSIBLE[model_type]})" if model_type in NOT_EXPRESSIBLE else ""
    return f"model_type {model_type!r}{reason} is not supported; import takes {', '.join(ARCHS)}"


class UnsupportedModel(ValueError):
    """A model (Strata or HF) with a feature the other side cannot express."""


# ----------------------------------------------------------------------------------------
# NemotronH's dt clamp, which moved between transformers releases
# ----------------------------------------------------------------------------------------

OLDEST_TRANSFORMERS = (5, 23)
"""pyproject.toml's hf extra starts here: before 5.23 Mamba2's and Bamba's gated RMSNorm norms over the
whole width instead of per group, NemotronH spells its layer types and its embedding otherwise."""

NEMOTRON_LIMIT_CLAMP_SINCE = (5, 25)
"""Which field transformers' NemotronH clamps dt to, in its chunked scan (training and prompts):

- 5.25 and later: `time_step_limit`, both ends, as Mamba2 and Bamba do (the mixer stores
  config.time_step_limit; time_step_min, time_step_max and time_step_floor only seed dt_bias's init);
- 5.15 to 5.24: [time_step_min, inf) (the mixer sets its own time_step_limit to that and never reads
  config.time_step_limit on its PyTorch path).

Strata's range starts at OLDEST_TRANSFORMERS. From 5.15 on no class clamps in its one-token decoding
step; Strata clamps on every path, so that its decoding equals its (and their) full forward."""


def release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string: '5.25.0' and '5.26.0.dev0' -> (5, 25), (5, 26)."""
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


@functools.cache
def installed_transformers() -> str | None:
    """The installed transformers' version, read without importing it; None where it is absent."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def nemotron_h_clamps_limit() -> bool:
    """True where the installed transformers clamps NemotronH's dt to time_step_limit (5.25 and later, or
    no transformers at all: what a fresh install gets), False where to [time_step_min, inf)."""
    version = installed_transformers()
    return version is None or release(version) >= NEMOTRON_LIMIT_CLAMP_SINCE


def _installed_transformers() -> str:
    version = installed_transformers()
    return f"transformers {version}" if version else "no transformers installed"


def _other_nemotron_clamp(time_step_min: float, time_step_limit: list[float]) -> tuple[str, list[float]]:
    """(the releases, the clamp) that the NemotronH config fields mean where the installed release does not."""
    if nemotron_h_clamps_limit():
        low = time_step_min if time_step_min > NO_CLAMP_TIME_STEP_MIN else 0.0
        return "before 5.25", [low, math.inf]
    return "5.25 and later", list(time_step_limit)


# ----------------------------------------------------------------------------------------
# What each target can express
# ----------------------------------------------------------------------------------------

def unsupported_features(cfg: ModelConfig, arch: str) -> list[str]:
    """The features of `cfg` that `arch` cannot express, each as a short phrase; [] if none."""
    has_attn, has_mlp = "*" in cfg.pattern, "-" in cfg.pattern
    problems = []
    if (arch == "nemotron_h" and "M" in cfg.pattern and math.isfinite(cfg.mamba.dt_limit[1])
            and not nemotron_h_clamps_limit()):
        problems.append(f"mamba.dt_limit={cfg.mamba.dt_limit} has an upper bound (NemotronH clamps dt from below "
                        f"only before transformers 5.25; {_installed_transformers()} is installed)")
    if arch == "bamba" and cfg.residual_in_fp32:
        problems.append("residual_in_fp32=true (Bamba keeps the residual stream in the weights' dtype)")
    if arch == "nemotron_h":
        if has_attn and cfg.attention.rope:
            problems.append("RoPE on attention (attention.rope=true; NemotronH attention has none)")
        if has_attn and cfg.attention.qkv_bias:
            problems.append("attention.qkv_bias=true (NemotronH attention has no bias)")
        if has_mlp and cfg.mlp.activation != "relu2":
            problems.append(f"mlp.activation={cfg.mlp.activation} (NemotronH MLPs are relu2)")
    elif arch == "mamba2":
        if set(cfg.pattern) != {"M"}:
            problems.append(f"pattern {cfg.pattern!r} has blocks other than 'M' (Mamba2 has only Mamba2 blocks)")
    elif arch == "bamba":
        pairs = [cfg.pattern[i:i + 2] for i in range(0, len(cfg.pattern), 2)]
        if any(len(p) != 2 or p[0] not in "M*" or p[1] != "-" for p in pairs):
            problems.append(f"pattern {cfg.pattern!r} is not pairs of a mixer then an MLP ('M-' or '*-')")
        if has_mlp and cfg.mlp.activation != "swiglu":
            problems.append(f"mlp.activation={cfg.mlp.activation} (Bamba MLPs are SwiGLU)")
        if has_attn and not cfg.attention.rope:
            problems.append("attention without RoPE (attention.rope=false; Bamba attention always has RoPE)")
    else:
        raise ValueError(f"--arch: {arch!r} is not one of {', '.join(ARCHS)}")
    return problems


def choose_arch(cfg: ModelConfig, arch: str = "auto") -> str:
    """The HF target for `cfg`: `arch` itself after checking it, or the first that fits for 'auto'.

    Refuses with one line naming the feature and the targets that would work.
    """
    fits = [a for a in ARCHS if not unsupported_features(cfg, a)]
    if arch == "auto":
        if fits:
            return fits[0]
        reasons = "; ".join(f"{a}: {unsupported_features(cfg, a)[0]}" for a in ARCHS)
        raise UnsupportedModel(f"no Hugging Face target can express this model ({reasons})")
    problems = unsupported_features(cfg, arch)
    if problems:
        hint = f"use --arch {' or --arch '.join(fits)}" if fits else "no other target fits either"
        raise UnsupportedModel(f"cannot export to {arch}: {problems[0]}; {hint}")
    return arch


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

def _mamba_nheads(cfg: ModelConfig) -> int:
    return cfg.mamba.nheads(cfg.d_model)


def hf_config_kwargs(cfg: ModelConfig, arch: str, special_ids: dict | None = None) -> dict:
    """Keyword arguments of the transformers config class of `arch` (model_type included)."""
    m, a = cfg.mamba, cfg.attention
    head_dim = a.resolved_head_dim(cfg.d_model)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, tie_word_embeddings=cfg.tie_embeddings,
                  initializer_range=cfg.init_std, **(special_ids or {}))
    if arch == "nemotron_h":
        return dict(
            model_type="nemotron_h", **common,
            layers_block_type=[NEMOTRON_LAYER_TYPES[c] for c in cfg.pattern],
            num_attention_heads=a.n_heads, num_key_value_heads=a.resolved_kv_heads(), head_dim=head_dim,
            max_position_embeddings=cfg.max_seq_len, attention_bias=False,
            intermediate_size=cfg.mlp.resolved_d_ff(cfg.d_model), mlp_hidden_act="relu2", mlp_bias=cfg.mlp.bias,
            ssm_state_size=m.d_state, mamba_num_heads=_mamba_nheads(cfg), mamba_head_dim=m.headdim,
            n_groups=m.ngroups, conv_kernel=m.d_conv, expand=m.expand, chunk_size=m.chunk_size,
            **_nemotron_h_time_steps(m),
            use_conv_bias=m.conv_bias, use_bias=m.proj_bias, mamba_proj_bias=m.proj_bias,
            layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32)
    if arch == "mamba2":
        return dict(
            model_type="mamba2", **common, num_hidden_layers=len(cfg.pattern),
            num_heads=_mamba_nheads(cfg), head_dim=m.headdim, state_size=m.d_state, expand=m.expand,
            conv_kernel=m.d_conv, n_groups=m.ngroups, use_bias=m.proj_bias, use_conv_bias=m.conv_bias,
            layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32, time_step_min=m.dt_min,
            time_step_max=m.dt_max, time_step_floor=m.dt_init_floor, time_step_limit=list(m.dt_limit),
            chunk_size=m.chunk_size)
    if arch == "bamba":
        return dict(
            model_type="bamba", **common, num_hidden_layers=len(cfg.pattern) // 2,
            attn_layer_indices=[i // 2 for i, c in enumerate(cfg.pattern) if c == "*"],
            num_attention_heads=a.n_heads, num_key_value_heads=a.resolved_kv_heads(),
            **({"head_dim": a.head_dim} if a.head_dim else {}),  # unset: hidden_size / heads, as Strata's 0
            max_position_embeddings=cfg.max_seq_len, attention_bias=a.qkv_bias,
            rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta,
                             "partial_rotary_factor": a.rope_fraction},
            intermediate_size=cfg.mlp.resolved_d_ff(cfg.d_model), hidden_act="silu", mlp_bias=cfg.mlp.bias,
            rms_norm_eps=cfg.norm_eps, mamba_n_heads=_mamba_nheads(cfg), mamba_d_head=m.headdim,
            mamba_n_groups=m.ngroups, mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand,
            mamba_chunk_size=m.chunk_size, mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.proj_bias,
            time_step_limit=list(m.dt_limit), z_loss_coefficient=0.0)
    raise ValueError(f"--arch: {arch!r} is not one of {', '.join(ARCHS)}")


def _nemotron_h_time_steps(m: MambaConfig) -> dict:
    """NemotronH's time_step_* fields that make the installed transformers clamp dt to m.dt_limit."""
    if nemotron_h_clamps_limit():
        return dict(time_step_min=m.dt_min, time_step_max=m.dt_max, time_step_floor=m.dt_init_floor,
                    time_step_limit=list(m.dt_limit))
    # before 5.25 the clamp is [time_step_min, inf); no lower limit is the marker, which keeps
    # log(time_step_min) (dt_bias's init) finite
    return dict(time_step_min=m.dt_limit[0] or NO_CLAMP_TIME_STEP_MIN, time_step_max=m.dt_max,
                time_step_floor=m.dt_init_floor, time_step_limit=[0.0, math.inf])


def export_notes(cfg: ModelConfig, arch: str) -> list[str]:
    """What the user should know about an export: a NemotronH file whose dt clamp the releases of
    transformers on the other side of 5.25 read differently (it is written for the installed one)."""
    if arch != "nemotron_h" or "M" not in cfg.pattern:
        return []
    fields = _nemotron_h_time_steps(cfg.mamba)
    releases, other = _other_nemotron_clamp(fields["time_step_min"], fields["time_step_limit"])
    if other == list(cfg.mamba.dt_limit):
        return []
    return [f"written for {_installed_transformers()}, where NemotronH clamps dt to mamba.dt_limit="
            f"{cfg.mamba.dt_limit}; transformers {releases} reads the same config.json as a clamp to {other}"]


def model_config_from_hf(hf) -> tuple[ModelConfig, str]:
    """Strata's ModelConfig from a transformers config object (NemotronH, Mamba2 or Bamba).

    Refuses, with one line, any feature Strata's model cannot express.
    """
    arch = getattr(hf, "model_type", None)
    if arch not in ARCHS:
        raise UnsupportedModel(unsupported_type(arch))
    readers = {"nemotron_h": _from_nemotron_h, "mamba2": _from_mamba2, "bamba": _from_bamba}
    cfg = readers[arch](hf)
    try:
        cfg.validate()
    except ValueError as e:
        raise UnsupportedModel(f"the {arch} config maps to an invalid Strata config: {e}") from None
    return cfg, arch


def import_notes(hf) -> list[str]:
    """What the user should know about an imported model: a NemotronH whose dt clamp the releases of
    transformers on the other side of 5.25 read differently (Strata clamps as the installed one does)."""
    if getattr(hf, "model_type", None) != "nemotron_h":
        return []
    limit = [float(v) for v in (getattr(hf, "time_step_limit", None) or (0.0, math.inf))]
    ours = _dt_limit(hf, "nemotron_h")
    releases, other = _other_nemotron_clamp(getattr(hf, "time_step_min", 0.0) or 0.0, limit)
    if other == ours:
        return []
    return [f"NemotronH clamps dt to {ours} in {_installed_transformers()}, and Strata does the same; "
            f"transformers {releases} clamps this config.json to {other} (time_step_min="
            f"{getattr(hf, 'time_step_min', 0.0):g}, time_step_limit={limit})"]


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UnsupportedModel(message)


def _expand(hf, arch: str, d_inner: int) -> int:
    require(d_inner % hf.hidden_size == 0,
             f"{arch}: the Mamba2 width heads*head_dim = {d_inner} is not a multiple of hidden_size "
             f"{hf.hidden_size}; Strata's d_inner is expand*d_model with an integer expand")
    return d_inner // hf.hidden_size


def _mamba_from(hf, arch, d_state, headdim, nheads, ngroups, d_conv, conv_bias, proj_bias, chunk) -> MambaConfig:
    return MambaConfig(d_state=d_state, d_conv=d_conv, expand=_expand(hf, arch, nheads * headdim), headdim=headdim,
                       ngroups=ngroups, chunk_size=chunk, conv_bias=conv_bias, proj_bias=proj_bias,
                       dt_min=_init_dt_min(hf, arch),
                       dt_max=getattr(hf, "time_step_max", MambaConfig.dt_max),
                       dt_init_floor=getattr(hf, "time_step_floor", MambaConfig.dt_init_floor),
                       dt_limit=_dt_limit(hf, arch))


def _dt_limit(hf, arch: str) -> list[float]:
    """The clamp the installed transformers applies to dt: time_step_limit, except NemotronH's before 5.25,
    [time_step_min, inf] (a time_step_min at or below the no-clamp marker clamps nothing)."""
    if arch == "nemotron_h" and not nemotron_h_clamps_limit():
        t_min = getattr(hf, "time_step_min", 0.0) or 0.0
        return [float(t_min) if t_min > NO_CLAMP_TIME_STEP_MIN else 0.0, math.inf]
    limit = [float(v) for v in (getattr(hf, "time_step_limit", None) or (0.0, math.inf))]
    require(len(limit) == 2 and 0 <= limit[0] < limit[1],
             f"{arch}: time_step_limit={limit} is not [low, high] with 0 <= low < high")
    return limit


def _init_dt_min(hf, arch: str) -> float:
    """time_step_min as an init setting; the no-clamp marker that NemotronH files exported for transformers
    before 5.25 carry is not one (from 5.25 on it is kept, so that the file round-trips)."""
    t_min = getattr(hf, "time_step_min", 0.0) or 0.0
    if arch == "nemotron_h" and nemotron_h_clamps_limit() and t_min > 0:
        return float(t_min)
    return t_min if t_min > NO_CLAMP_TIME_STEP_MIN else MambaConfig.dt_min


def _from_nemotron_h(hf) -> ModelConfig:
    letters = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-"}
    kinds = list(hf.layers_block_type)
    bad = sorted(set(kinds) - set(letters))
    require(not bad, f"nemotron_h: layer types {bad} (MoE) have no Strata block; Strata has M, * and -")
    require(getattr(hf, "mamba_hidden_act", "silu") in ("silu", "swish"),
             f"nemotron_h: mamba_hidden_act={hf.mamba_hidden_act}; Strata's conv activation is SiLU")
    pattern = "".join(letters[k] for k in kinds)
    if "-" in pattern:
        require(hf.mlp_hidden_act == "relu2",
                 f"nemotron_h: mlp_hidden_act={hf.mlp_hidden_act}; Strata's ungated MLP is relu2")
    if "*" in pattern:
        require(getattr(hf, "sliding_window", None) is None,
                 "nemotron_h: sliding_window attention; Strata's attention is full causal")
    mamba = _mamba_from(hf, "nemotron_h", hf.ssm_state_size, hf.mamba_head_dim, hf.mamba_num_heads, hf.n_groups,
                        hf.conv_kernel, hf.use_conv_bias, hf.use_bias, hf.chunk_size)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        pattern=pattern, d_model=hf.hidden_size, vocab_size=hf.vocab_size, max_seq_len=hf.max_position_embeddings,
        norm_eps=hf.layer_norm_epsilon, tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=hf.initializer_range, residual_in_fp32=bool(getattr(hf, "residual_in_fp32", False)), mamba=mamba,
        attention=AttentionConfig(n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
                                  head_dim=head_dim, rope=False, qkv_bias=False),
        mlp=MLPConfig(d_ff=hf.intermediate_size, activation="relu2", bias=hf.mlp_bias))


def _from_mamba2(hf) -> ModelConfig:
    require(hf.hidden_act in ("silu", "swish"), f"mamba2: hidden_act={hf.hidden_act}; Strata's is SiLU")
    mamba = _mamba_from(hf, "mamba2", hf.state_size, hf.head_dim, hf.num_heads, hf.n_groups, hf.conv_kernel,
                        hf.use_conv_bias, hf.use_bias, hf.chunk_size)
    return ModelConfig(pattern="M" * hf.num_hidden_layers, d_model=hf.hidden_size, vocab_size=hf.vocab_size,
                       norm_eps=hf.layer_norm_epsilon, tie_embeddings=bool(hf.tie_word_embeddings),
                       init_std=hf.initializer_range, residual_in_fp32=bool(hf.residual_in_fp32), mamba=mamba)


def _from_bamba(hf) -> ModelConfig:
    rope = dict(hf.rope_parameters or {})
    require(rope.get("rope_type", "default") == "default",
             f"bamba: rope_type={rope.get('rope_type')}; Strata's RoPE is the default (unscaled) one")
    # transformers' Bamba rotates the first int(head_dim * factor) channels of each head: rope_parameters'
    # factor, which its config class sets to 0.5 unless the file names one
    factor = float(rope.get("partial_rotary_factor", 1.0))
    resolved = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rotary = int(resolved * factor)
    require(0 < factor <= 1 and rotary > 0 and rotary % 2 == 0,
            f"bamba: partial_rotary_factor={factor} rotates {rotary} of each head's {resolved} channels; "
            f"Strata's RoPE (attention.rope_fraction) needs an even number > 0")
    require(hf.hidden_act in ("silu", "swish"), f"bamba: hidden_act={hf.hidden_act}; Strata's gated MLP is SwiGLU")
    mamba = _mamba_from(hf, "bamba", hf.mamba_d_state, hf.mamba_d_head, hf.mamba_n_heads, hf.mamba_n_groups,
                        hf.mamba_d_conv, hf.mamba_conv_bias, hf.mamba_proj_bias, hf.mamba_chunk_size)
    pattern = "".join("*-" if t == "full_attention" else "M-" for t in hf.layers_block_type)
    # unset (hidden_size / heads) is Strata's 0, and an export leaves it unset again
    head_dim = resolved if getattr(hf, "head_dim", None) or hf.hidden_size % hf.num_attention_heads else 0
    return ModelConfig(
        pattern=pattern, d_model=hf.hidden_size, vocab_size=hf.vocab_size, max_seq_len=hf.max_position_embeddings,
        norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings), init_std=hf.initializer_range,
        mamba=mamba,
        attention=AttentionConfig(n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
                                  head_dim=head_dim, rope=True, rope_theta=rope.get("rope_theta", 10000.0),
                                  rope_fraction=factor, qkv_bias=bool(hf.attention_bias)),
        mlp=MLPConfig(d_ff=hf.intermediate_size, activation="swiglu", bias=hf.mlp_bias))
