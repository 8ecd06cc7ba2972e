"""PyTorch reference for the LM head fused with cross-entropy: all logits materialised."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """hidden (N, d), weight (V, d), targets (N,). Mean over targets that are not ignored."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
