"""`strata import`: a Hugging Face NemotronH, Mamba2 or Bamba checkpoint as a Strata run.

    strata import --format hf --from hf/nemotron-h --out runs/nemotron-ft
    strata import --format hf --from hf/mamba2 --out runs/m2 --config configs/tiny.yaml train.lr=1e-4
    strata train --config runs/nemotron-ft/config.yaml          # continue pretraining / fine-tune

Writes <out>/config.yaml (the model section derived from the HF config, the rest from
--config and the overrides, train.run_dir = <out>) and a weights-only checkpoint
<out>/checkpoints/step_00000000 that `strata train` starts from with a fresh optimizer,
schedule and data order. The tokenizer the HF directory holds is copied into <out> as training
keeps one (with the checksums of its files, <out>/tokenizer.sha256) and becomes data.tokenizer:
its tokenizer.json with tokenizer_config.json / special_tokens_map.json, or its sentencepiece
tokenizer.model when it has one (the original a tokenizer.json beside it was converted from);
`strata generate` and `strata export` read that copy from anywhere. Without one, set
data.tokenizer yourself (training then copies it there).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from strata.launcher.errors import report_and_exit_code
from strata.model import hf


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="hf", choices=["hf"], help="input format (Hugging Face transformers)")
    p.add_argument("--from", dest="source", required=True, help="HF model directory (config.json + weights)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--config", default=None, help="YAML for the non-model sections (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the written config, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def resolve_tying(cfg, arch: str, state: dict) -> None:
    """HF NemotronH never ties (whatever tie_word_embeddings says): tie only when its lm_head
    is the embedding exactly (as `strata export` writes a tied model)."""
    if arch == "nemotron_h" and cfg.tie_embeddings:
        head, embed = state.get("lm_head.weight"), state.get("embed.weight")
        cfg.tie_embeddings = head is None or (embed is not None and torch.equal(head, embed))


@torch.no_grad()
def check_weights(cfg, state: dict, source: Path) -> None:
    """Every parameter of HybridLM(cfg) present with its shape, nothing left over."""
    from strata.model.hybrid import HybridLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in HybridLM(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise hf.UnsupportedModel(f"{source}: weights do not match its config (missing {missing[:3]}, "
                                  f"unexpected {extra[:3]}); the directory is partial or not this model")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise hf.UnsupportedModel(f"{source}: {name} has shape {tuple(state[name].shape)}, the config "
                                      f"implies {shape}; the weights and config.json disagree")


def read_hf_model(source: str | Path) -> tuple[object, str, dict]:
    """(Strata ModelConfig, arch, Strata state dict) of an HF directory; one-line errors."""
    source = Path(source)
    if not source.is_dir():
        raise hf.UnsupportedModel(f"--from {source} is not a directory; give a Hugging Face model directory")
    hf_config = hf.read_hf_config(source)
    cfg, arch = hf.model_config_from_hf(hf_config)
    for note in hf.import_notes(hf_config):
        print(f"note: {note}", file=sys.stderr)
    hf_state = hf.load_weights(source)
    state = hf.from_hf_state_dict(hf_state, dataclasses.replace(cfg, tie_embeddings=False), arch)
    if cfg.tie_embeddings:
        resolve_tying(cfg, arch, state)
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
    check_weights(cfg, state, source)
    return cfg, arch, state


def run_config_text(model_cfg, out: Path, base: str | None, overrides: list[str], tokenizer: Path | None) -> str:
    """The YAML of the imported run: the derived model, the rest from --config and overrides."""
    import yaml

    from strata.launcher.config import DEFAULT_CONFIG, dump_yaml, load_config

    base_cfg = load_config(base or DEFAULT_CONFIG)
    raw = yaml.safe_load(dump_yaml(base_cfg))
    raw["model"] = dataclasses.asdict(model_cfg)
    raw["train"]["run_dir"] = str(out)
    raw["train"]["seq_len"] = min(raw["train"]["seq_len"], model_cfg.max_seq_len)
    if tokenizer is not None:
        raw["data"]["tokenizer"] = str(tokenizer)
    staged = out / "config.yaml.tmp"
    staged.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        return dump_yaml(load_config(staged, overrides))  # validates the whole config
    finally:
        staged.unlink()


def import_checkpoint(source: str | Path, out: str | Path, base: str | None = None,
                      overrides: list[str] = ()) -> tuple[Path, str, str | None]:
    """Create the run; returns (checkpoint dir, arch, a note for the user or None)."""
    from strata.data.tokenizer import MAIN_FILES, Tokenizer, install_run_tokenizer
    from strata.launcher.config import ConfigError
    from strata.parallel.checkpoint.files import write_weights_only

    hf.require_transformers("strata import")
    source, out = Path(source), Path(out)
    if (out / "checkpoints").exists():
        raise FileExistsError(f"--out {out} already holds a run (checkpoints/); give a new run directory")
    cfg, arch, state = read_hf_model(source)
    has_one = any((source / name).is_file() for name in MAIN_FILES)
    held = Tokenizer(source) if has_one else None  # loaded: a damaged one is refused here, not at training
    if held is not None and held.vocab_size > cfg.vocab_size:
        raise ValueError(f"{held.path} has {held.vocab_size} tokens, more than the model's vocabulary of "
                         f"{cfg.vocab_size} ({source / 'config.json'}): it is not this model's tokenizer; "
                         "fix the directory")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, note = None, None
    if held is not None:  # the run's copy and checksums, as training writes them
        tokenizer = install_run_tokenizer(held, out)
    else:
        note = (f"{source} has no tokenizer (tokenizer.json or a sentencepiece tokenizer.model): set data.tokenizer "
                f"in {out}/config.yaml to the model's tokenizer before training")
    try:
        text = run_config_text(cfg, out, base, list(overrides), tokenizer)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    (out / "config.yaml").write_text(text)
    ckpt = write_weights_only(out / "checkpoints", state)
    return ckpt, arch, note


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from strata.data.errors import DataError

    try:
        ckpt, arch, note = import_checkpoint(args.source, args.out, args.config, args.overrides)
    except (ImportError, ValueError, OSError, DataError) as e:
        return report_and_exit_code(e)
    print(f"imported {hf.ARCHITECTURES[arch]} from {args.source} into {ckpt}; "
          f"train with: strata train --config {Path(args.out) / 'config.yaml'}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
