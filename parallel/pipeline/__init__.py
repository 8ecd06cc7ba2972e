"""Pipeline parallelism: the model as DeepSpeed's PipelineModule, stages balanced by FLOPs (stages.py).

May import: strata.model, strata.kernels, strata.parallel.tensor, strata.parallel.context, and the
foundation modules of strata.parallel (guard, topology). Not the engine or checkpoints.
"""
