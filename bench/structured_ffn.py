"""Structured FFN benchmark (Wei et al., NeurIPS 2024): speed of the MLP, and a small
training study on the embedded corpus. Prints markdown tables; results and their reading
are in docs/STRUCTURED_FFN.md.

    python bench/structured_ffn.py speed                                   # this CPU, widths 1024..4096
    python bench/structured_ffn.py speed --device cuda --tokens 16384      # GPU, bf16
    python bench/structured_ffn.py train --steps 300                       # CPU: dense vs structured, equal steps
    python bench/structured_ffn.py train --device cuda --steps 1000 --prepared-dir .strata/data/<corpus>

`speed` times forward + backward of one MLP block (relu2, d_ff = 4 d_model, the paper's
FFN shape) for dense and each structure at 32% and 63% of the dense parameters, plus one
decoding token through a single up-projection, structured vs pre-merged. `train` trains the
same small hybrid with each MLP variant for the same number of steps (plain AdamW loop, no
DeepSpeed, so that it also runs where DeepSpeed is not installed) and reports eval loss.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from strata.kernels import ops  # noqa: E402
from strata.model.config import MLPConfig, ModelConfig  # noqa: E402
from strata.model.guidance import SelfGuidance, remove_from_optimizer  # noqa: E402
from strata.model.hybrid import HybridLM  # noqa: E402
from strata.model.mlp import MLP  # noqa: E402
from strata.model.structured import count_params, structured_linears  # noqa: E402

SPEED_VARIANTS = [("dense", 0.0), ("lowrank", 0.32), ("blockdense", 0.32), ("blockshuffle", 0.32),
                  ("lowrank", 0.63), ("blockdense", 0.63), ("blockshuffle", 0.63)]
TRAIN_VARIANTS = {"dense": dict(),
                  "lowrank 63%": dict(structure="lowrank", param_fraction=0.63),
                  "lowrank 32%": dict(structure="lowrank", param_fraction=0.32),
                  "lowrank 32% + self-guided": dict(structure="lowrank", param_fraction=0.32, self_guided=True),
                  "lowrank 32% + self-guided, every step": dict(structure="lowrank", param_fraction=0.32,
                                                                self_guided=True, guide_stochastic=False),
                  "blockdense 32%": dict(structure="blockdense", param_fraction=0.32),
                  "blockshuffle 32%": dict(structure="blockshuffle", param_fraction=0.32)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """The fastest of `repeats` timed calls: on a shared machine the minimum is the least
    disturbed estimate of what the code itself costs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def mlp_for(structure: str, fraction: float, width: int) -> MLP:
    cfg = MLPConfig(activation="relu2", d_ff=4 * width, structure=structure, param_fraction=fraction)
    cfg.validate(width)
    return MLP(cfg, width, layer_idx=1)


def speed(args) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.tokens or (16384 if device.type == "cuda" else 512)
    print(f"MLP forward+backward, relu2, d_ff = 4 x width, {tokens} tokens, {dtype}, {device} "
          f"(blockdiag backend: {ops.backend_for(torch.empty(0, device=device))}); best of {args.repeats}\n")
    print("| width | structure | share of dense params | ms | speed-up vs dense | decode 1 token: structured / merged us |")
    print("| --- | --- | --- | --- | --- | --- |")
    for width in args.widths:
        torch.manual_seed(0)
        dense_ms = None
        for structure, fraction in SPEED_VARIANTS:
            mlp = mlp_for(structure, fraction, width).to(device, dtype)
            x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)

            def step():
                mlp(x).float().square().mean().backward()

            ms = 1e3 * best_seconds(step, device, args.repeats)
            dense_ms = dense_ms or ms
            share = sum(count_params(m) for m in (mlp.up_proj, mlp.down_proj)) / (8 * width * width)
            print(f"| {width} | {structure} | {share:.3f} | {ms:.2f} | {dense_ms / ms:.2f}x | "
                  f"{decode_microseconds(mlp.up_proj, device, dtype, args.repeats)} |", flush=True)
            del mlp, x
            if device.type == "cuda":
                torch.cuda.empty_cache()


@torch.no_grad()
def decode_microseconds(linear, device, dtype, repeats: int) -> str:
    x = torch.randn(1, linear.in_features, device=device, dtype=dtype)
    structured = 1e6 * best_seconds(lambda: linear(x), device, 5 * repeats)
    if not hasattr(linear, "dense_weight"):
        return f"{structured:.0f} (dense)"
    w = linear.dense_weight()
    merged = 1e6 * best_seconds(lambda: F.linear(x, w), device, 5 * repeats)
    return f"{structured:.0f} / {merged:.0f}"


# -- (b) the training study ------------------------------------------------------------

def study_model_cfg(width: int, vocab: int, seq_len: int, mlp: dict) -> ModelConfig:
    cfg = ModelConfig(pattern="M-*-M-", d_model=width, vocab_size=vocab, max_seq_len=seq_len,
                      mlp=MLPConfig(activation="relu2", **mlp))
    cfg.mamba.d_state, cfg.mamba.headdim = 32, 32
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 8, 4
    cfg.validate()
    return cfg


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("embed.weight")]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("embed.weight"))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def train_variant(name: str, mlp: dict, corpus, data_cfg, args, device) -> dict:
    from strata.data.config import DataConfig
    from strata.data.corpus import open_corpus
    from strata.data.loader import TrainLoader, eval_batches
    from strata.data.prepare import ensure_prepared
    torch.manual_seed(args.seed)
    cfg = study_model_cfg(args.width, corpus.tokenizer.vocab_size, args.seq_len, mlp)
    model = HybridLM(cfg).to(device)
    guidance = SelfGuidance(model, cfg.mlp, args.steps, args.seed) if cfg.mlp.self_guided else None
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    loader = TrainLoader(corpus, data_cfg, args.seq_len, args.batch, 0, 1, args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.perf_counter()
    for step in range(args.steps):
        if guidance is not None:
            if guidance.should_drop(step):
                remove_from_optimizer(opt, guidance.drop_dense_paths(model))
            guidance.update(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = next(loader)
        with autocast:
            loss = model(batch["input_ids"].to(device), labels=batch["labels"].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    loader.close()
    model.eval()
    evals = eval_batches(corpus, data_cfg, args.seq_len, args.batch, args.eval_batches)
    with torch.no_grad(), autocast:
        losses = [model(b["input_ids"].to(device), labels=b["labels"].to(device)).item() for b in evals]
    mlp_params = sum(count_params(m) for m in structured_linears(model))
    return {"name": name, "eval_loss": sum(losses) / len(losses), "seconds": elapsed,
            "params": sum(p.numel() for p in model.parameters()), "structured_params": mlp_params}


def train(args) -> None:
    from strata.data.config import DataConfig
    from strata.data.corpus import open_corpus
    from strata.data.loader import TrainLoader, eval_batches
    from strata.data.prepare import ensure_prepared
    device = torch.device(args.device)
    data_cfg = DataConfig(prepared_dir=args.prepared_dir) if args.prepared_dir else DataConfig()
    if not args.prepared_dir:
        ensure_prepared(data_cfg)
    corpus = open_corpus(data_cfg)
    print(f"training study: pattern M-*-M-, d_model {args.width}, relu2 d_ff {4 * args.width}, first MLP dense, "
          f"{args.steps} steps x {args.batch} x {args.seq_len} tokens, lr {args.lr}, seed {args.seed}, {device}\n")
    print("| variant | params | eval loss | eval ppl | train s |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.variants:
        r = train_variant(name, TRAIN_VARIANTS[name], corpus, data_cfg, args, device)
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['eval_loss']:.4f} | {math.exp(r['eval_loss']):.2f} | "
              f"{r['seconds']:.0f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="MLP forward+backward time, dense vs structured")
    s.add_argument("--device", default="cpu")
    s.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    s.add_argument("--tokens", type=int, default=0, help="rows per batch; 0: 512 on CPU, 16384 on GPU")
    s.add_argument("--repeats", type=int, default=5)
    t = sub.add_parser("train", help="small training study on the embedded corpus, equal steps")
    t.add_argument("--device", default="cpu")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--width", type=int, default=256)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--eval-batches", type=int, default=32)
    t.add_argument("--prepared-dir", default="", help="an already prepared corpus (default: prepare stdlib)")
    t.add_argument("--variants", nargs="+", default=[v for v in TRAIN_VARIANTS if "every step" not in v],
                   choices=list(TRAIN_VARIANTS))
    args = p.parse_args(argv)
    (speed if args.command == "speed" else train)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
