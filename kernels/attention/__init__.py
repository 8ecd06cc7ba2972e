"""Attention over packed documents: a block-causal mask for SDPA (reference.py), and PyTorch's
FlashAttention variable-length kernel on CUDA (varlen.py), which skips the masked blocks."""
