"""Strata kernels: Triton kernels for the hot paths, each beside its PyTorch reference.

Callers use `kernels.ops` only; it chooses the backend per call.
"""
