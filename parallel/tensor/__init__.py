"""Tensor parallelism: the model's blocks with their projections split over TP ranks (megatron-core's
process groups and region mappings), and the split rules that the layout checks and the plan read.

    mappings.py   TPContext and the regions (copy / reduce / scatter / gather), sequence parallelism
    linears.py    the TP forms of the structured linears (LowRank, BlockDense, BlockShuffle)
    splits.py     how each parameter is split over TP ranks: the one rule, for the model and for checkpoints
    blocks.py     a HybridLM's TP form, built from outside (model/ has no process groups), and its loss

May import: strata.model, strata.kernels, megatron-core. Nothing else of strata.parallel.
"""
