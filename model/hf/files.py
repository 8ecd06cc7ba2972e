"""The files of an HF model directory: config.json and safetensors weights (transformers is
imported only here, lazily)."""
from __future__ import annotations

import torch

from strata.model.config import ModelConfig
from strata.model.hf.config import (ARCHITECTURES, ARCHS, OLDEST_TRANSFORMERS, UnsupportedModel, hf_config_kwargs,
                                    release, require, unsupported_type)

# ----------------------------------------------------------------------------------------
# Files: config.json and safetensors weights (transformers is imported only here, lazily)
# ----------------------------------------------------------------------------------------

INSTALL_HINT = "pip install 'strata[hf]' (or: pip install 'transformers>=5.23' safetensors)"
MAX_SHARD_BYTES = 5 * 2**30


def require_transformers(action: str):
    """The transformers module, or an ImportError whose message is one line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{action} needs Hugging Face transformers, which is not installed: {INSTALL_HINT}") from None
    if release(transformers.__version__) < OLDEST_TRANSFORMERS:
        raise ImportError(f"{action} needs transformers >= {'.'.join(map(str, OLDEST_TRANSFORMERS))} "
                          f"(found {transformers.__version__}): {INSTALL_HINT}")
    return transformers


def build_hf_config(cfg: ModelConfig, arch: str, special_ids: dict | None = None, dtype: str = "float32"):
    """The transformers config object of `arch` for `cfg`, ready for save_pretrained."""
    transformers = require_transformers("export")
    kwargs = hf_config_kwargs(cfg, arch, special_ids)
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config.architectures = [ARCHITECTURES[arch]]
    config.dtype = dtype
    return config


def save_weights(out_dir, tensors: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors` as model.safetensors, or as numbered shards plus model.safetensors.index.json
    when they exceed max_shard_bytes (transformers' layout). Returns the file names."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    _readable = _umask_mode()
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file({k: v.contiguous() for k, v in shards[0].items()}, out_dir / "model.safetensors",
                  metadata={"format": "pt"})
        (out_dir / "model.safetensors").chmod(_readable)  # safetensors writes 0600; a model is for sharing
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        names.append(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file({k: v.contiguous() for k, v in shard.items()}, out_dir / names[-1], metadata={"format": "pt"})
        (out_dir / names[-1]).chmod(_readable)
        weight_map.update({k: names[-1] for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]


def _umask_mode() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def load_weights(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint directory (safetensors, sharded or not; or
    pytorch_model.bin read with weights_only, never unpickling code)."""
    import json
    from pathlib import Path

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        from safetensors.torch import load_file

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (hf_dir / f).is_file()]
        require(not missing, f"{hf_dir} is missing weight shards {missing[:3]} named by its index; download them")
        return {k: v for f in files for k, v in load_file(hf_dir / f).items()}
    if (hf_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(hf_dir / "model.safetensors")
    if (hf_dir / "pytorch_model.bin").is_file():
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
    raise UnsupportedModel(f"{hf_dir} has no weights (model.safetensors, its sharded index, or pytorch_model.bin)")


def read_hf_config(hf_dir):
    """The transformers config of a checkpoint directory, after checking it is one Strata imports."""
    import json
    from pathlib import Path

    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UnsupportedModel(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise UnsupportedModel(f"{path} is not a readable JSON config ({e.__class__.__name__})") from None
    if model_type is None:
        raise UnsupportedModel(f"{path} has no model_type: not a transformers model directory "
                               f"(strata import takes {', '.join(ARCHS)})")
    if model_type not in ARCHS:
        raise UnsupportedModel(f"{hf_dir}: {unsupported_type(model_type)}")
    transformers = require_transformers("strata import")
    try:
        return transformers.AutoConfig.from_pretrained(hf_dir)
    except (ValueError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise UnsupportedModel(f"{path} is not a valid {model_type} config: {first[:200]}") from None
