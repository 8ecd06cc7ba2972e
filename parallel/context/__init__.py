"""Context parallelism: each sequence split over CP ranks, every block exact (issue 25).

    pieces.py   CPContext: the load-balanced sharding (2 x CP pieces, rank r holds pieces r and
                2CP-1-r), the autograd-aware all-gather, and the loss summed over the sequence
    mamba.py    Mamba2 under CP: the conv's halo from the piece before, and SSD state passing
    attention.py  causal attention of the local query pieces against the gathered K/V
    blocks.py   a HybridLM's CP form, built from outside (model/ has no process groups)

Why state passing and not Megatron's head all-to-all: docs/PARALLEL.md, "Context parallelism".

May import: strata.model, strata.kernels. Nothing else of strata.parallel.
"""
