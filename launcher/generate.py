"""`strata generate`: continue a prompt with a trained checkpoint (incremental decoding).

    strata generate --checkpoint runs/tiny --prompt "def fibonacci(n):"
    strata generate --checkpoint runs/tiny --prompt "import " --temperature 0.8 --top-p 0.95 --max-new-tokens 200

Greedy by default. --temperature T > 0 samples; --top-k / --top-p sample too, at temperature 1
unless --temperature says otherwise (with --temperature 0 they are ignored, and say so). A draw is
reproducible by --seed: the same seed, the same text. Stops at EOS, after --max-new-tokens, or at
the model's max_seq_len. Prints the prompt followed by the generated text. A prompt longer than
--prefill-chunk tokens goes through the model in pieces that continue from the caches.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from strata.launcher.errors import report_and_exit_code
from strata.model.generate import DEFAULT_PREFILL_CHUNK, Sampling, generate


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step_XXXXXXXX directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128, help=">= 1")
    p.add_argument("--temperature", type=float, default=None,
                   help="finite, >= 0; 0 is greedy (default: greedy, or 1.0 with --top-k or --top-p)")
    p.add_argument("--top-k", type=int, default=0, help=">= 0; 0 keeps all tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 keeps all tokens")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling draws (default 0)")
    p.add_argument("--tokenizer", default=None,
                   help="the run's tokenizer (sentencepiece .model, tokenizer.json or HF model directory), for a run "
                        "without its copy (default: the copy in the run directory)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=">= 1; a longer prompt goes through the model this many tokens at a time "
                        f"(chunked prefill: same logits, bounded memory; default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', ...")
    return imply_sampling(p.parse_args(argv))


def imply_sampling(args: argparse.Namespace) -> argparse.Namespace:
    """--top-k and --top-p ask for sampling: without --temperature they sample at 1.0. A flag that
    greedy decoding cannot use (--top-k, --top-p, --seed) says so in one line on stderr."""
    filtered = args.top_k != 0 or args.top_p != 1.0
    if args.temperature is None:
        args.temperature = 1.0 if filtered else 0.0
    if args.temperature == 0:
        unused = [flag for flag, given in (("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0),
                                           ("--seed", args.seed is not None)) if given]
        if unused:
            why = ("--temperature 0 decodes greedily" if filtered else
                   "decoding is greedy (--temperature above 0, --top-k or --top-p samples)")
            print(f"note: {' and '.join(unused)} ignored: {why}", file=sys.stderr)
    args.seed = 0 if args.seed is None else args.seed
    return args


@torch.no_grad()
def load_model(ckpt, cfg, device: torch.device):
    """HybridLM with the checkpoint's weights (built on the meta device, weights assigned:
    one copy of the model in memory), computing what training evaluates at that step: in the
    self-guided phase, each structured linear's dense path mixed in at the step's a."""
    from strata.launcher.export import self_guided_alpha
    from strata.model.hybrid import HybridLM
    from strata.parallel.checkpoint.consolidate import consolidate

    # fp32 like training's master weights, whatever dtype an imported checkpoint was stored in
    state = {k: v.float() if v.is_floating_point() else v for k, v in consolidate(ckpt, cfg.model).items()}
    return HybridLM.from_state(cfg.model, state, self_guided_alpha(ckpt, state)).to(device).eval()


def flag_problem(args: argparse.Namespace) -> str | None:
    """The first flag that cannot work (non-finite or out of range), as one line."""
    if args.prefill_chunk < 1:
        return f"--prefill-chunk: must be >= 1, got {args.prefill_chunk}"
    try:
        Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, None, args.seed).validate()
    except ValueError as e:
        field, _, problem = str(e).partition(": ")
        return f"--{field.replace('_', '-')}: {problem}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = flag_problem(args)  # before any checkpoint is read
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from strata.data.errors import DataError
    from strata.data.tokenizer import Tokenizer
    from strata.launcher.config import load_run_config
    from strata.launcher.export import find_tokenizer, guided_note
    from strata.model.structured import premerge_where_faster, structured_linears
    from strata.parallel.checkpoint.consolidate import CheckpointError, resolve_checkpoint

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        cfg = load_run_config(ckpt)
        tokenizer = Tokenizer(find_tokenizer(ckpt, args.tokenizer))
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise DataError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than the model's "
                            f"vocabulary of {cfg.model.vocab_size}: it is not this run's tokenizer; pass the run's "
                            "with --tokenizer PATH")
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            tokenizer.eos_id, args.seed)
        prompt = tokenizer.encode(args.prompt)
        model = load_model(ckpt, cfg, device)
        guided = [m.guide_alpha for m in structured_linears(model) if m.guide is not None]
        if guided:
            print(f"note: {guided_note(ckpt, guided[0], 'generating with')}", file=sys.stderr)
        premerge_where_faster(model, tokens=1)  # decoding feeds one token a step; measured, not assumed
        start = time.perf_counter()
        out = generate(model, prompt, sampling, allowed_vocab=tokenizer.vocab_size,  # never a padded id
                       prefill_chunk=args.prefill_chunk)
    except (CheckpointError, DataError, OSError, ValueError) as e:  # PromptTooLong is a ValueError
        return report_and_exit_code(e)
    elapsed = time.perf_counter() - start
    new = out.new_tokens[0].tolist()
    if out.stopped == "eos":
        new = new[:-1]
    print(args.prompt + tokenizer.decode(new))
    print(f"[{len(new)} tokens in {elapsed:.2f}s, stopped at {out.stopped}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
