"""Conversion between Strata's model (config + state dict) and Hugging Face transformers'
Mamba2, NemotronH and Bamba formats: config mapping, parameter names, and the files
(config.json, safetensors). No CLI here (launcher/export.py, launcher/import_hf.py);
transformers is imported lazily, only to build or read its config objects.

The three targets and what each can express of a Strata model (--arch auto tries them in
this order):

| target      | blocks                                | attention             | MLP              |
| ----------- | ------------------------------------- | --------------------- | ---------------- |
| mamba2      | only M                                | -                     | -                |
| nemotron_h  | any string of M, *, - (the same letters) | no RoPE, no qkv bias | relu2 (up, down) |
| bamba       | pairs: (M or *) then -                | RoPE, full or partial | SwiGLU           |

Details checked against transformers' modeling files and matched exactly:
- every block is pre-norm residual with its own RMSNorm; one eps for all norms, the gated
  norm included (layer_norm_epsilon / rms_norm_eps); the gated norm is
  rmsnorm(y * silu(z)) over groups of d_inner / ngroups channels (norm_before_gate=False);
- in_proj's output layout is [z, xBC, dt], xBC = [x, B, C], conv over xBC with bias;
- Mamba2 is token-for-token mamba_ssm: dt = clamp(softplus(dt + dt_bias), *dt_limit),
  A = -exp(A_log), D skip. dt_limit is HF Mamba2's and Bamba's time_step_limit, and NemotronH's
  from transformers 5.25 on; before 5.25 NemotronH clamps to [time_step_min, inf] and ignores its
  time_step_limit (config.py NEMOTRON_LIMIT_CLAMP_SINCE: import and export follow the installed
  release, and name the clamp the other releases would read from the same file). Written for a
  release before 5.25, a model without a lower limit is time_step_min = 1e-30, which clamps
  nothing and keeps log(time_step_min), which HF's init of dt_bias takes, finite. transformers
  and mamba_ssm clamp in their chunked (prompt) path but not in their one-token decoding step;
  Strata clamps on every path, so that its decoding equals its own (and their) full forward;
- RoPE is the rotate-half (GPT-NeoX / Llama) convention on the first int(head_dim *
  partial_rotary_factor) channels of each head, frequencies over those channels only, the rest
  unrotated: Strata's attention.rope_fraction, written to and read from rope_parameters (Bamba's
  config class sets 0.5, Bamba-9B's, where a file names none);
- HF NemotronH never ties lm_head to the embedding (its _tied_weights_keys is empty):
  a tied model is written with lm_head a copy and tie_word_embeddings = true as a note;
- Bamba's attention_bias puts a bias on o_proj too: exported as zeros, imported only if zero;
- residual_in_fp32 (Mamba2, NemotronH) is model.residual_in_fp32 (transformers' NemotronH reads
  but ignores it; NVIDIA's NemotronH code and mamba_ssm keep the stream in fp32 as Strata does);
  Bamba has none, so a model with it cannot be written as Bamba;
- NemotronH weights are named "backbone.*" on disk (transformers renames them to "model.*"
  in memory and back when saving); both are read.

The package: config.py (what each target expresses, the config mapping), names.py (parameter
names), files.py (config.json and safetensors). Its public names are imported here.
"""
from strata.model.hf.config import (ARCHITECTURES, ARCHS, NEMOTRON_LAYER_TYPES, NO_CLAMP_TIME_STEP_MIN,
                                    UnsupportedModel, choose_arch, export_notes, hf_config_kwargs, import_notes,
                                    model_config_from_hf, nemotron_h_clamps_limit, unsupported_features)
from strata.model.hf.files import (INSTALL_HINT, MAX_SHARD_BYTES, build_hf_config, load_weights, read_hf_config,
                                   require_transformers, save_weights)
from strata.model.hf.names import from_hf_state_dict, name_prefixes, to_hf_state_dict

__all__ = ["ARCHITECTURES", "ARCHS", "INSTALL_HINT", "MAX_SHARD_BYTES", "NEMOTRON_LAYER_TYPES", "NO_CLAMP_TIME_STEP_MIN",
           "UnsupportedModel", "build_hf_config", "choose_arch", "export_notes", "from_hf_state_dict",
           "hf_config_kwargs", "import_notes", "nemotron_h_clamps_limit", "load_weights", "model_config_from_hf", "name_prefixes", "read_hf_config",
           "require_transformers", "save_weights", "to_hf_state_dict", "unsupported_features"]
