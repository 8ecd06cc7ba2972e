"""PyTorch reference for the causal depthwise conv1d (with optional SiLU) of Mamba2.

Channel-last layout: x (b, l, d), weight (d, w), bias (d,). The decode state holds
the last w inputs of each channel, oldest first: (b, d, w), as causal-conv1d keeps it.
seq_idx (b, l), int (causal-conv1d's seq_idx): the document of each token of a packed row;
an output reads only inputs of its own document, as if each document ran alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(y, activation):
    if activation in (None, "none"):
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"causal_conv1d: unknown activation {activation!r}; use 'silu' or None")


def causal_conv1d_ref(x, weight, bias=None, activation="silu", seq_idx=None):
    width = weight.shape[1]
    if seq_idx is not None:
        return _activate(_packed_conv(x, weight, bias, seq_idx), activation)
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=width - 1, groups=weight.shape[0])
    return _activate(y[..., : x.shape[1]].transpose(1, 2), activation)


def _packed_conv(x, weight, bias, seq_idx):
    """y_t = bias + sum_k weight[:, k] x_{t-w+1+k}, over inputs of t's document only."""
    width, length = weight.shape[1], x.shape[1]
    xp = F.pad(x, (0, 0, width - 1, 0))
    docs = F.pad(seq_idx, (width - 1, 0), value=-1)  # the conv's zero padding: no document
    y = None
    for k in range(width):
        same = (docs[:, k:k + length] == seq_idx)[..., None]
        term = torch.where(same, xp[:, k:k + length] * weight[:, k], 0.0)
        y = term if y is None else y + term
    return y if bias is None else y + bias


def conv_state_from_inputs(x, width):
    """The decode state after a prompt x (b, l, d): its last `width` inputs, zero-padded on the left."""
    tail = x[:, -width:].transpose(1, 2)
    return F.pad(tail, (width - tail.shape[-1], 0))


def causal_conv1d_step_ref(x, conv_state, weight, bias=None, activation="silu"):
    """One token: x (b, d). Returns (y (b, d), new_state); the caller's state is not modified."""
    new_state = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    y = (new_state * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation).to(x.dtype), new_state
