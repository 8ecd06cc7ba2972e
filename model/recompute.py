"""Activation recompute's seam in the model (the policy is set from outside: parallel/parallelize.py
apply_recompute, from train.recompute).

Two kinds of region can be recomputed in the backward instead of keeping their activations:

- a mixer's `core`: the memory-heavy, FLOP-light middle between its big matmuls (Mamba2: conv,
  SSD scan and gated norm; attention: RoPE, GQA and SDPA; MLP: the activation). The matmul
  outputs that enter it are kept. Set by `recompute_core = True` on the mixer ('selective').
- a whole block: only its input is kept. Set by `recompute = True` on the Block ('full').

A region runs through torch.utils.checkpoint (non-reentrant) while autograd records; the model has
no randomness, so the recomputed activations, and the gradients, are bitwise those of a run
without recompute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_if(enabled: bool, fn, *args, into=None):
    """fn(*args), or into(fn(*args)). When `enabled` and autograd records, fn is a checkpoint
    region: only its inputs are kept, the rest is recomputed in the backward. With `into` (the op
    that consumes fn's output, e.g. the MLP's down projection) the output is not kept either:
    what `into` saves of it is recomputed from fn when its backward needs it (so pass `into` only
    where fn costs next to nothing: it then runs three times)."""
    if not (enabled and torch.is_grad_enabled()):
        out = fn(*args)
        return out if into is None else into(out)
    out = checkpoint(fn, *args, use_reentrant=False)
    if into is None:
        return out
    with torch.autograd.graph.saved_tensors_hooks(*_recomputed_when_unpacked(out, fn, args)):
        return into(out)


@dataclass(frozen=True)
class _Recompute:
    """Stands, among the saved tensors, for a view of fn's output."""
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _recomputed_when_unpacked(out: torch.Tensor, fn, args: tuple):
    """saved_tensors_hooks under which any tensor saved on out's storage (out or a view of it) is
    saved as the recipe to recompute it, under the autocast state of the forward."""
    ptr, device = out.untyped_storage().data_ptr(), out.device.type
    autocast = dict(enabled=torch.is_autocast_enabled(device), dtype=torch.get_autocast_dtype(device))

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() != ptr:
            return t
        return _Recompute(t.size(), t.stride(), t.storage_offset())

    def unpack(saved):
        if not isinstance(saved, _Recompute):
            return saved
        with torch.no_grad(), torch.autocast(device, **autocast):
            return fn(*args).as_strided(saved.size, saved.stride, saved.offset)

    return pack, unpack
