"""The engine around a training step: the model as a layout trains it (parallelize.py), the DeepSpeed
engine built from our config (build.py) and a step's micro-batches through it (steps.py).

May import: strata.model, strata.kernels, strata.parallel.tensor, strata.parallel.context,
strata.parallel.pipeline, and the foundation modules of strata.parallel (config, guard, layout,
topology). Not checkpoints.
"""
