"""Activation recompute's seam in the model (the policy is set from outside: parallel/engine/parallelize.py
apply_recompute, from train.recompute).

Two kinds of region can be recomputed in the backward instead of keeping their activations:

- a mixer's `core`: the memory-heavy, FLOP-light middle between its big matmuls (Mamba2: conv,
  SSD scan and gated norm; attention: RoPE, GQA and SDPA; MLP: the activation). The matmul
  outputs that enter it are kept. Set by `recompute_core = True` on the mixer ('selective').
- a whole block: only its input is kept. Set by `recompute = True` on the Block ('full').

A region is one autograd node (`_Recomputed`): its forward runs fn without recording, keeping only
fn's inputs; its backward runs fn again while recording and backpropagates through that copy. The
model has no randomness, so the recomputed activations, and the gradients, are bitwise those of a
run without recompute.

Why not torch.utils.checkpoint: its non-reentrant form records the region's graph in the forward
and routes every tensor the region saves through a pack and an unpack hook, which a launch-bound
step pays on the host: about twice the region's cost over no recompute
(bench/recompute_speed.py; docs/BENCHMARKS.md, "Recompute on the host"). The region here is what
its reentrant form does, without the RNG and device-state bookkeeping a model without randomness
does not need. Parameters used inside fn get their gradients in the nested backward, as under
DeepSpeed's own (reentrant) activation checkpointing, which ZeRO's gradient hooks are written for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def checkpoint_if(enabled: bool, fn, *args, into=None):
    """fn(*args), or into(fn(*args)). When `enabled` and autograd records, fn is a checkpoint
    region: only its inputs are kept, the rest is recomputed in the backward. With `into` (the op
    that consumes fn's output, e.g. the MLP's down projection) the output is not kept either:
    what `into` saves of it is recomputed from fn when its backward needs it (so pass `into` only
    where fn costs next to nothing: it then runs three times)."""
    if not (enabled and torch.is_grad_enabled() and _any_requires_grad(args)):
        out = fn(*args)
        return out if into is None else into(out)
    out = _region(fn, *args)
    if into is None:
        return out
    with torch.autograd.graph.saved_tensors_hooks(*_recomputed_when_unpacked(out, fn, args)):
        return into(out)


def _region(fn, *args) -> torch.Tensor:
    """fn(*args) as one recomputed region (bench/recompute_speed.py times torch.utils.checkpoint
    in its place)."""
    return _Recomputed.apply(fn, _autocast_state(args), *args)


def _any_requires_grad(args: tuple) -> bool:
    """A region's output records its backward only if an input needs a gradient; where none does
    (parameters alone inside fn would), the region runs as plain code, keeping its activations,
    so that those parameters still get their gradients."""
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _autocast_state(args: tuple) -> tuple[str, bool, torch.dtype]:
    """(device type, enabled, dtype) of the autocast around the region's forward, re-entered when
    the backward recomputes it (the backward runs outside it)."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


class _Recomputed(torch.autograd.Function):
    """fn(*args), keeping only args: see the module's docstring. fn returns one tensor."""

    @staticmethod
    def forward(ctx, fn, autocast, *args):
        ctx.fn, ctx.autocast = fn, autocast
        ctx.tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_at))
        return fn(*args)

    @staticmethod
    def backward(ctx, grad):
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*args)
        _release_storage(out)
        torch.autograd.backward(out, grad)
        return (None, None, *(a.grad if isinstance(a, torch.Tensor) else None for a in args))


def _release_storage(out: torch.Tensor) -> None:
    """Frees the recomputed output's memory while its backward runs: backpropagating from it reads
    only its graph and shape, and no op of the region keeps it (where one does, that op's saved
    copy holds the storage and nothing is freed). The output's shape is kept, on one element."""
    out.data = torch.empty((), dtype=out.dtype, device=out.device).expand(out.shape)


@dataclass(frozen=True)
class _Recompute:
    """Stands, among the saved tensors, for a view of fn's output."""
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _recomputed_when_unpacked(out: torch.Tensor, fn, args: tuple):
    """saved_tensors_hooks under which any tensor saved on out's storage (out or a view of it) is
    saved as the recipe to recompute it, under the autocast state of the forward."""
    ptr = out.untyped_storage().data_ptr()
    device, enabled, dtype = _autocast_state(args)

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() != ptr:
            return t
        return _Recompute(t.size(), t.stride(), t.storage_offset())

    def unpack(saved):
        if not isinstance(saved, _Recompute):
            return saved
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            return fn(*args).as_strided(saved.size, saved.stride, saved.offset)

    return pack, unpack
