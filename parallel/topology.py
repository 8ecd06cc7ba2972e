"""Process groups for TP x CP x PP x DP: megatron-core's parallel_state, and the `mpu` view of
them that DeepSpeed takes so that ZeRO shards over the data-parallel ranks only.

    topo = init_topology(tp=2, pp=2)        # after torch.distributed is initialised
    engine = deepspeed.initialize(..., mpu=topo.engine_mpu)   # the mpu for pp == 1, else None
    PipelineModule(..., topology=topo.deepspeed_topology())   # pp > 1 (DeepSpeed's own grid)

Rank order is megatron's "tp-cp-ep-dp-pp": TP fastest, then CP, then DP, then PP, i.e.
rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank)). DeepSpeed's pipeline grid
(axes pipe, data, model) numbers ranks the same way; `deepspeed_topology` checks it.
A 1 x 1 x 1 layout (data parallel only) creates no groups and never imports megatron-core,
whose import costs seconds.

Context-parallel ranks hold the same parameters: to DeepSpeed they are data-parallel ranks (the
mpu's data-parallel group is megatron's data-parallel-with-context-parallel one; without an mpu,
the world), so their gradients are averaged together with data parallelism's, as Megatron does.
`dp` and `dp_rank` count the data-parallel ranks proper, which draw different samples.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from strata.parallel.layout import Layout


def _ps():
    from megatron.core import parallel_state

    return parallel_state


class Topology:
    """The layout of this job and this rank's place in it. Also DeepSpeed's `mpu`: the
    methods named get_* are the ones DeepSpeed's engine and ZeRO optimizers call.

    'Model parallel' in DeepSpeed's sense is TP x PP: its grad-norm all-reduce runs over
    that group and counts a replicated parameter on tensor-parallel rank 0 only."""

    def __init__(self, layout: Layout, rank: int):
        self.layout, self.rank = layout, rank
        self.tp, self.cp, self.pp, self.dp = layout.tp, layout.cp, layout.pp, layout.dp
        self.tp_rank = rank % self.tp
        self.cp_rank = rank // self.tp % self.cp
        self.dp_rank = rank // (self.tp * self.cp) % self.dp
        self.pp_rank = rank // (self.tp * self.cp * self.dp)

    @property
    def model_parallel(self) -> bool:
        return self.tp * self.pp > 1

    @property
    def has_groups(self) -> bool:
        """Whether megatron's groups exist (any of TP, CP, PP above 1)."""
        return self.tp * self.cp * self.pp > 1

    @property
    def engine_mpu(self):
        """What deepspeed.initialize takes as mpu: this object when tensors are split and
        the plain engine runs (pp = 1); None for the pipeline engine (it reads the grid from
        its PipelineModule) and for pure data parallelism."""
        return self if self.tp > 1 and self.pp == 1 else None

    # -- tensor parallel ---------------------------------------------------------------
    def get_tensor_model_parallel_group(self):
        return _ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank - self.tp_rank

    # -- pipeline parallel -------------------------------------------------------------
    def get_pipeline_model_parallel_group(self):
        return _ps().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    # -- context parallel --------------------------------------------------------------
    def get_context_parallel_group(self):
        return _ps().get_context_parallel_group() if self.cp > 1 else None

    # -- data parallel, as DeepSpeed reduces gradients: with the context-parallel ranks ---
    def get_data_parallel_group(self):
        return _ps().get_data_parallel_group(with_context_parallel=True) if self.has_groups else dist.group.WORLD

    def get_data_parallel_rank(self) -> int:
        return self.cp_rank + self.cp * self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp * self.cp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # -- model parallel (TP x PP), DeepSpeed's notion ------------------------------------
    def get_model_parallel_group(self):
        return _ps().get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank + self.tp * self.pp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp * self.pp

    # -- DeepSpeed's pipeline grid -------------------------------------------------------
    def deepspeed_topology(self):
        """DeepSpeed's description of the same grid, for its PipelineModule (which creates
        groups through deepspeed.comm, so that is pointed at the running job first)."""
        import deepspeed
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        deepspeed.init_distributed(dist_backend=dist.get_backend())
        # The CP ranks are data-parallel ones to DeepSpeed (they reduce gradients together): its
        # data axis is megatron's cp and dp, cp fastest, as the ranks are numbered.
        topo = PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp * self.cp)
        coord = topo.get_coord(self.rank)
        if (coord.pipe, coord.data, coord.model) != (self.pp_rank, self.get_data_parallel_rank(), self.tp_rank):
            raise RuntimeError(f"rank {self.rank}: DeepSpeed's grid puts it at (pp, dp, tp)="
                               f"{(coord.pipe, coord.data, coord.model)}, megatron's order at "
                               f"{(self.pp_rank, self.get_data_parallel_rank(), self.tp_rank)}")
        return topo

    def __repr__(self) -> str:
        cp = f" cp={self.cp_rank}" if self.cp > 1 else ""
        return f"Topology({self.layout}, rank tp={self.tp_rank}{cp} pp={self.pp_rank} dp={self.dp_rank})"


def init_topology(tp: int, pp: int, cp: int = 1) -> Topology:
    """This rank's place in TP x CP x PP x DP, and (unless tp = cp = pp = 1) megatron's groups for
    it on the initialised default group. Gloo side-groups are not created: on CPU the
    default backend already is gloo, and nothing of ours needs them on GPU."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * cp * pp):
        raise ValueError(f"parallel: tp*cp*pp={tp * cp * pp} does not divide the world size {world}")
    topo = Topology(Layout(tp, pp, world // (tp * cp * pp), cp=cp), rank)
    destroy_topology()
    if topo.has_groups:
        ps = _ps()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp, create_gloo_process_groups=False)
        megatron = (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(), ps.get_data_parallel_rank(),
                    ps.get_pipeline_model_parallel_rank())
        if megatron != (topo.tp_rank, topo.cp_rank, topo.dp_rank, topo.pp_rank):
            raise RuntimeError(f"rank {rank}: megatron's groups put it at (tp, cp, dp, pp)={megatron}, "
                               f"expected {(topo.tp_rank, topo.cp_rank, topo.dp_rank, topo.pp_rank)}")
    return topo


def destroy_topology() -> None:
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
