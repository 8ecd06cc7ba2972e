"""`strata export`: a trained checkpoint as a Hugging Face transformers model directory.

    strata export --checkpoint runs/tiny --format hf --out hf/tiny
    strata export --checkpoint runs/tiny/checkpoints/step_00000300 --format hf --arch bamba --out hf/tiny

The directory loads with transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained:
config.json (NemotronH, Mamba2 or Bamba: --arch auto picks the first that expresses the
model, see model/hf/), safetensors weights, generation_config.json, and the run's tokenizer: a
Hugging Face one as its tokenizer.json, a sentencepiece one as tokenizer.json (a fast tokenizer
built from the model) with tokenizer.model beside it, and either way a tokenizer_config.json that
names the special tokens Strata uses and adds none to a prompt, so that transformers' tokenizer
gives the ids `strata generate` feeds the model (a special token's string inside the text aside:
Strata encodes it as text). The checkpoint is read shard by shard
(parallel/checkpoint/consolidate.py), whatever its parallel layout; structured MLPs are pre-merged
into dense weights. A checkpoint of the self-guided phase is written as the model training
evaluates at that step: each dense path W and structure S frozen into a W + (1 - a) S with the
step's a (a note names the step and a).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from strata.launcher.errors import report_and_exit_code
from strata.model import hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step_XXXXXXXX directory")
    p.add_argument("--format", default="hf", choices=["hf"], help="output format (Hugging Face transformers)")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--arch", default="auto", choices=("auto",) + hf.ARCHS, help="transformers model class")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the written weights")
    p.add_argument("--tokenizer", default=None,
                   help="the run's tokenizer (sentencepiece .model, tokenizer.json or HF model directory), for a run "
                        "without its copy (default: the copy in the run directory)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------

def find_tokenizer(ckpt: Path, override: str | None) -> Path:
    """The run's tokenizer (its main file): the copy training put in its run directory (from any
    working directory, with or without the prepared corpus), or --tokenizer for a run without one."""
    from strata.data.tokenizer import run_tokenizer_path
    from strata.parallel.checkpoint.consolidate import run_dir_of

    return run_tokenizer_path(run_dir_of(ckpt), override)


def dense_mlp_config(cfg):
    """The ModelConfig of the same model with its MLPs dense (what pre-merging produces)."""
    mlp = dataclasses.replace(cfg.mlp, structure="dense", param_fraction=0.0, rank=0, nblocks=0,
                              self_guided=False, equal_flops=False)
    return dataclasses.replace(cfg, mlp=mlp)


def self_guided_alpha(ckpt: Path, state: dict) -> float | None:
    """The self-guided a that training's evaluation used at this checkpoint (the schedule's value
    for its step's forward, saved in the manifest under self_guided); None when the checkpoint
    holds no dense paths (no self-guided training, or the guided phase ended before it)."""
    if not any(name.endswith(".guide") for name in state):
        return None
    from strata.parallel.checkpoint.consolidate import CheckpointError
    from strata.parallel.checkpoint.files import read_manifest

    saved = read_manifest(ckpt).get("self_guided")
    if saved is None:
        raise CheckpointError(f"{ckpt} holds self-guided dense paths but its manifest has no self_guided state "
                              "(the mixing coefficient a); it was not written by strata train")
    return float(saved["alpha"])


def guided_note(ckpt: Path, alpha: float | None, what: str) -> str | None:
    if alpha is None:
        return None
    return (f"{ckpt.name} is in the self-guided phase: {what} a W + (1 - a) S with a = {alpha:.6g}, "
            "as training evaluates this step")


@torch.no_grad()
def premerge_structured(state: dict, cfg, alpha: float | None = None) -> tuple[dict, object]:
    """Structured MLP linears replaced by their exact dense weights (built on the meta device,
    the checkpoint's tensors assigned in place: no second copy of the model); dense paths of the
    self-guided phase still in `state` folded in at `alpha` (self_guided_alpha)."""
    if cfg.mlp.structure == "dense":
        return state, cfg
    from strata.model.hybrid import HybridLM
    from strata.model.structured import to_dense

    if alpha is None and any(name.endswith(".guide") for name in state):
        raise ValueError("the checkpoint holds self-guided dense paths: give the a they are mixed in at")
    model = HybridLM.from_state(cfg, state, alpha)
    to_dense(model)
    return model.state_dict(), dense_mlp_config(cfg)


def special_ids(tok) -> dict:
    """config.json's special ids: those the tokenizer names, None for one it has not."""
    return {f"{role}_id": tok.special_ids.get(role) for role in ("bos_token", "eos_token", "pad_token")}


def fast_tokenizer(sp_model: Path):
    """A `tokenizers` Tokenizer that encodes as the sentencepiece model does.

    Same pieces, scores and normalisation (precompiled charsmap, whitespace collapsing, dummy
    prefix, spaces as U+2581), byte fallback, control pieces as special tokens. Known limits
    (measured on 60 stdlib files: 0.05% of token positions; both sides decode to the same text):
    a whitespace run longer than the longest whitespace piece is an exact tie that the two
    libraries break in opposite orders (16+12 spaces vs 12+16), and on long inputs
    sentencepiece accumulates Viterbi scores in float32 (tokenizers in float64), so near-ties
    may split differently; text containing the special tokens' strings or U+2581 itself
    encodes differently from data/tokenizer.py.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = pb.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    byte_fallback = trainer.byte_fallback
    if trainer.model_type == pb.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=trainer.unk_id,
                               byte_fallback=byte_fallback)
    elif trainer.model_type == pb.TrainerSpec.BPE:
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

        vocab, _, merges = SentencePieceExtractor(str(sp_model)).extract()
        model = models.BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=byte_fallback)
    else:
        raise ValueError(f"tokenizer {sp_model}: sentencepiece model type {trainer.model_type} is not unigram or "
                         "BPE; export supports those two")
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("\u2581", " ")] + ([decoders.ByteFallback()] if byte_fallback else [])
    decode.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(decode)
    specials = [p.piece for p in proto.pieces if p.type in (pb.ModelProto.SentencePiece.CONTROL,
                                                             pb.ModelProto.SentencePiece.UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def write_tokenizer(tok, out: Path, max_len: int) -> None:
    """tokenizer.json (+ tokenizer.model for sentencepiece) and a tokenizer_config.json for
    transformers' PreTrainedTokenizerFast: the special tokens of ``tok`` (a data.Tokenizer), no
    BOS/EOS added to an input (Strata's encode adds none: an HF tokenizer.json whose post-processor
    adds some is written without it, otherwise as the run holds it), decode without space clean-up;
    an HF tokenizer's own settings (chat template, added tokens...) kept, its custom code (auto_map) not."""
    from tokenizers import Tokenizer as Fast

    from strata.data.tokenizer import ROLES, SENTENCEPIECE, special_tokens_config

    if tok.kind == SENTENCEPIECE:
        fast_tokenizer(Path(tok.path)).save(str(out / "tokenizer.json"))
        shutil.copyfile(tok.path, out / "tokenizer.model")
        config = {}
    else:
        text = Path(tok.path).read_text(encoding="utf-8")
        post = Fast.from_str(text).post_processor
        if post is not None and post.num_special_tokens_to_add(False):  # a template that adds BOS/EOS
            text = json.dumps({**json.loads(text), "post_processor": None}, ensure_ascii=False, indent=2)
        (out / "tokenizer.json").write_text(text, encoding="utf-8")
        config = {k: v for k, v in special_tokens_config(tok.files).items() if k != "auto_map"}
    specials = {role: tok.token(tok.special_ids[role]) if role in tok.special_ids else None for role in ROLES}
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, **specials,
                   "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False})
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def export_checkpoint(checkpoint: str | Path, out: str | Path, arch: str = "auto", dtype: str = "float32",
                      tokenizer: str | None = None,
                      max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> tuple[Path, str, str | None]:
    """Write the HF directory; returns (out, the arch written, the notes for the user)."""
    from strata.data.tokenizer import Tokenizer
    from strata.launcher.config import load_run_config
    from strata.parallel.checkpoint.consolidate import consolidate, resolve_checkpoint

    hf.require_transformers("strata export")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty; give a new directory or remove it")
    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_run_config(ckpt)
    arch = hf.choose_arch(dense_mlp_config(cfg.model), arch)  # refuse before reading any weights
    tok = Tokenizer(find_tokenizer(ckpt, tokenizer))
    state = consolidate(ckpt, cfg.model)
    alpha = self_guided_alpha(ckpt, state)
    state, model_cfg = premerge_structured(state, cfg.model, alpha)
    tensors = {k: v.to(DTYPES[dtype]) for k, v in hf.to_hf_state_dict(state, model_cfg, arch).items()}
    del state
    ids = special_ids(tok)
    config = hf.build_hf_config(model_cfg, arch, ids, dtype)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    hf.save_weights(tmp, tensors, max_shard_bytes)
    write_tokenizer(tok, tmp, model_cfg.max_seq_len)
    generation = {k: v for k, v in ids.items() if v is not None}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    guided = guided_note(ckpt, alpha, "exported the dense weights")
    return out, arch, [*([guided] if guided else []), *hf.export_notes(model_cfg, arch)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from strata.data.errors import DataError
    from strata.parallel.checkpoint.consolidate import CheckpointError

    try:
        out, arch, notes = export_checkpoint(args.checkpoint, args.out, args.arch, args.dtype, args.tokenizer,
                                            int(args.max_shard_gb * 2**30))
    except (ImportError, ValueError, OSError, CheckpointError, DataError) as e:
        return report_and_exit_code(e)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"exported {args.checkpoint} as {hf.ARCHITECTURES[arch]} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
