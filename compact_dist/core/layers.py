"""CompAct replacements for Megatron-core's ColumnParallelLinear and RowParallelLinear.

They subclass Megatron's layers, so they take exactly the keyword arguments Megatron passes
through a ModuleSpec (config, init_method, bias, gather_output / input_is_parallel,
skip_bias_add, is_expert, tp_comm_buffer_name, tp_group, stride, ...), initialise `weight`
and `bias` with Megatron's own code (same values for the same seed) and return
(output, bias) like Megatron's. The extra keyword `compression` (a LayerCompression) selects:

- subspace mode: `weight` is the frozen base W0 (requires_grad=False, dtype
  `base_dtype`, kept through module.to()/bfloat16()) and `subspace_factor` is the trainable
  A, zero after every merge, with W_eff = W0 + A P^T; with base_dtype 'bf16_pair' W0 is
  `weight` (bf16, what forward multiplies with) + the buffer `weight_lo` (bf16, the rest);
- unbiased mode: `weight` stays trainable and gets the gradient G P P^T.

Either way only Z = X P is saved for backward. Tensor layout per TP rank:
  column-parallel: W0 [out/tp, in], A [out/tp, r], P dense [in, r], same on all TP ranks;
  row-parallel:    W0 [out, in/tp], A [out, r/tp], P block-diagonal, this rank's blocks.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

from compact_dist.core.autograd import SUBSPACE, compressed_linear
from compact_dist.core.base_weight import apply_keeping_base, freeze_base, full_base
from compact_dist.core.basis import SubspaceSketch
from compact_dist.core.collectives import reduce_scatter_to_sequence_parallel_region
from compact_dist.core.config import LayerCompression
from compact_dist.core.factor_state import ZeroTracker, new_factor
from compact_dist.core.grouped_merge import merge_layer
from compact_dist.core.kept_energy import GradientConsumers, KeptEnergy
from compact_dist.core.projection import Projection, unproject
from compact_dist.core.projection_state import ProjectionState

# Default layer ids in construction order (the same on every rank that builds the same model);
# compact_dist.core.subspace.assign_layer_ids() replaces them with ids from the model structure.
_construction_counter = itertools.count()


class CompactLinearMixin:
    """What the column- and row-parallel compact layers share: the wiring of their parts
    (W0 storage: core.base_weight; A and whether it is known zero: core.factor_state; P and
    its cache: core.projection_state; the merge: core.grouped_merge; the sketches of a
    data-aware P: core.basis / core.kept_energy) into Megatron's layer."""

    compression: LayerCompression
    merge_count: int

    @classmethod
    def _check_arguments(cls, compression, kwargs) -> None:
        """Reject what the compact layers do not support, before Megatron builds anything."""
        if not isinstance(compression, LayerCompression):
            raise ValueError(
                f"{cls.__name__} needs compression=LayerCompression(...), got "
                f"{type(compression).__name__}"
            )
        if kwargs["config"].gradient_accumulation_fusion:
            raise ValueError("compact layers do not support gradient_accumulation_fusion")
        if kwargs.get("is_expert"):
            raise ValueError("compact layers do not support MoE expert layers (is_expert=True)")
        if kwargs.get("skip_weight_param_allocation"):
            raise ValueError("compact layers own their weight: skip_weight_param_allocation")

    def _init_compression(
        self,
        compression: LayerCompression,
        layer_id: Optional[int],
        role: Optional[str],
        num_blocks: int,
        first_block: int,
        local_blocks: int,
        partition_dim: int,
    ) -> None:
        self.compression = compression
        self.role: Optional[str] = role
        self._projection = ProjectionState(Projection(
            seed=compression.seed,
            layer_id=next(_construction_counter) if layer_id is None else layer_id,
            in_features=self.input_size,
            rank=compression.rank_for(self.input_size, num_blocks),
            num_blocks=num_blocks,
            first_block=first_block,
            local_blocks=local_blocks,
        ))
        self.merge_count = 0
        self.sketch: Optional[SubspaceSketch] = None  # open while estimating the next P
        # open while a probe measures what P keeps of G (compact_dist.core.kept_energy)
        self.kept_energy: Optional[KeptEnergy] = None
        self.subspace_factor: Optional[torch.nn.Parameter] = None
        # set by a backend that keeps A out of the module's own parameter listing (its
        # per-module fetch): maps (A, A known zero) to what forward hands autograd
        self.forward_factor_hook: Optional[Callable] = None
        self._factor_zero = ZeroTracker()
        # the pair's low word: W0 = weight + weight_lo (bf16 each); None otherwise
        self.register_buffer("weight_lo", None)
        if compression.mode == SUBSPACE:
            w = self.weight
            self.weight_lo = freeze_base(w, compression.base_dtype)
            # column-parallel: [out/tp, r]; row-parallel: [out, r/tp]
            self.subspace_factor = new_factor(w.shape[0], self.projection.local_rank,
                                              self.config.params_dtype, w.device, partition_dim)
            self.mark_factor_zero()
        # the shapes of this TP shard's W0 and A as built (an engine that partitions them
        # leaves placeholders in the parameters)
        self.base_shape = tuple(self.weight.shape)
        self.factor_shape = (None if self.subspace_factor is None
                             else tuple(self.subspace_factor.shape))

    # ----------------------------------------------------------------------------- ids
    @property
    def projection(self) -> Projection:
        """The seeded geometry of this rank's P (compact_dist.core.projection.Projection)."""
        return self._projection.spec

    @property
    def layer_id(self) -> int:
        return self._projection.spec.layer_id

    def set_layer_id(self, layer_id: int) -> None:
        self._projection.set_layer_id(layer_id)

    # ----------------------------------------------------------------------------- A
    def factor_parameter(self) -> Optional[torch.nn.Parameter]:
        """A, read from the parameter dict without Module.__getattr__ (an engine that
        partitions parameters may gather one read that way during forward)."""
        return self._parameters.get("subspace_factor")

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator:
        """Module.named_parameters; the module's own listing (recurse=False: what a
        partitioning engine gathers around its forward and backward) leaves A out once a
        backend set forward_factor_hook (took A out of that fetch). The model's recursive
        listing (optimizer, checkpoints) still holds it."""
        hidden = None if recurse or self.forward_factor_hook is None else self.factor_parameter()
        for name, param in super().named_parameters(prefix, recurse, remove_duplicate):
            if param is not hidden:
                yield name, param

    def mark_factor_zero(self) -> None:
        """Declare A zero in every copy (what a merge or construction leaves)."""
        self._factor_zero.mark_zero(self.factor_parameter())

    def mark_factor_written(self) -> None:
        """Declare that A may have been written behind autograd's back (through `.data`, or by
        a checkpoint load), so forward uses W0 + s A P^T until the next merge."""
        if self.factor_parameter() is not None:
            self._factor_zero.mark_written()

    @property
    def factor_is_zero(self) -> bool:
        """True when A is known to be zero: this layer's merge (or construction) zeroed it and
        since then no optimizer step began anywhere in this process (an engine may write A
        through `.data`, invisible to the version counter), nothing wrote A in place (its
        version counter), and mark_factor_written() was not called. Forward then skips the
        A P^T term; otherwise it includes it, so outputs are exact either way. In the usual
        loop (merge right after every optimizer step) every forward skips it."""
        return self._factor_zero.is_zero(self.factor_parameter())

    # ----------------------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        return {**self._projection.extra_state(), "merge_count": self.merge_count}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self._projection.load_extra_state(state, self.weight.device)
            self.merge_count = int(state["merge_count"])

    def _apply(self, fn, recurse=True):
        """Keep the frozen base W0 (and the pair's low word) in its storage dtype through
        .to()/.bfloat16()/.cuda()."""
        if self.subspace_factor is None:
            return super()._apply(fn, recurse)
        return apply_keeping_base(self, super()._apply, fn, recurse)

    # -------------------------------------------------------------------- projections
    @property
    def projection_epoch(self) -> int:
        return self._projection.epoch

    @projection_epoch.setter
    def projection_epoch(self, epoch: int) -> None:
        self._projection.epoch = epoch

    @property
    def basis(self) -> Optional[torch.Tensor]:
        """The data-aware P (fp32 [local_blocks, block_in, block_rank], orthonormal blocks)
        once estimated; None: the seeded Gaussian P of the current epoch."""
        return self._projection.basis

    @basis.setter
    def basis(self, basis: Optional[torch.Tensor]) -> None:
        self._projection.basis = basis

    @property
    def _projection_cache(self) -> dict:
        return self._projection.cache

    def projection_blocks(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This rank's blocks of the current P: [local_blocks, block_in, block_rank] on W0's
        device (compact_dist.core.projection_state: cached until the next resample)."""
        return self._projection.blocks(dtype, self.weight.device)

    def projection_operand(self, dtype: torch.dtype) -> torch.Tensor:
        """This rank's P as forward and backward multiply it (projection.operand: the [in, r]
        matrix for at most DENSE_MAX_BLOCKS blocks, else the blocks), cached with the blocks."""
        return self._projection.operand(dtype, self.weight.device)

    def resample_projection(self, basis: Optional[torch.Tensor] = None) -> None:
        """Switch to the next projection epoch: P becomes `basis` (data-aware, fp32
        [local_blocks, block_in, block_rank]) or, without one, stays data-aware if it was,
        else the next seeded Gaussian P. A must be merged first."""
        if not self.factor_is_zero:
            raise RuntimeError("merge_subspace() must run before resample_projection()")
        self._projection.advance(basis, self.weight.device)

    # -------------------------------------------------------------------------- merge
    @property
    def merge_scale(self) -> float:
        """s in W_eff = W0 + s A P^T: `update_scale`. A's gradient is CompAct's G P
        (= dL/dA / s), so gradient clipping sees about the norm of G (a Gaussian P keeps
        ||G P|| ~ ||G|| in expectation, an orthonormal one ||G P|| <= ||G||)."""
        return self.compression.update_scale

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W_eff = W0 + s A P^T (fp32) of this rank's shard; W itself in unbiased mode."""
        w = full_base(self.weight, self.weight_lo)
        if self.subspace_factor is None:
            return w
        delta = unproject(self.subspace_factor.float(), self.projection_blocks(torch.float32))
        return w + self.merge_scale * delta

    def merge_subspace(self, lr: float = 0.0, weight_decay: float = 0.0,
                       factor: Optional[torch.Tensor] = None,
                       base_flat: Optional[torch.Tensor] = None, base_start: int = 0) -> None:
        """W0 <- W0 (1 - lr * weight_decay) + s A P^T; A <- 0 for this layer alone
        (compact_dist.core.grouped_merge.merge_layer, which documents the arguments)."""
        merge_layer(self, lr, weight_decay, factor, base_flat, base_start)

    # ---------------------------------------------------------------- data-aware P
    def start_sketch(self, kind) -> SubspaceSketch:
        """Begin estimating the next data-aware P from the current one (warm start); kind: a
        data-aware compact_dist.core.projection_kinds.ProjectionKind or its name. A data-aware
        P is handed over as the fp32 basis tensor itself (projection_blocks(fp32) is `basis`
        on its device), which the sketch references as Q0's first columns instead of copying:
        the basis is only ever replaced (resample_projection, a checkpoint load), never
        written in place, and the sketch raises if it was."""
        p = self.projection
        self.sketch = SubspaceSketch(
            self.projection_blocks(torch.float32), kind, self.compression.seed, self.layer_id,
            self.projection_epoch, p.first_block, orthonormal=self.basis is not None)
        return self.sketch

    def start_kept_energy(self) -> KeptEnergy:
        """Begin measuring the kept energy of the current P (fed by the next probe)."""
        self.kept_energy = KeptEnergy(functools.partial(self.projection_blocks, torch.float32),
                                      orthonormal=self.basis is not None)
        return self.kept_energy

    def _probe_consumer(self):
        """What this call's data feeds: the open sketch, the open kept-energy accumulator
        (a probe), or both from the same probe gradient; None when nothing is open."""
        sketch = self.sketch if self.sketch is not None and self.sketch.open else None
        energy = self.kept_energy if self.kept_energy is not None and self.kept_energy.open \
            else None
        if energy is None:
            return sketch
        if sketch is None:
            return energy
        if not sketch.fed_in_backward:
            raise RuntimeError("a kept-energy probe ran with a 'pca' sketch open: the probe's "
                               "inputs would enter the estimate of P")
        return GradientConsumers([sketch, energy])

    def _compressed(self, x, bias, sequence_parallel, allreduce_dgrad):
        sketch = self._probe_consumer()
        factor, factor_is_zero = self.factor_parameter(), self.factor_is_zero
        if self.forward_factor_hook is not None:
            factor = self.forward_factor_hook(factor, factor_is_zero)
        return compressed_linear(
            x,
            self.weight,
            factor,
            bias,
            self.projection_operand(x.dtype),
            self.compression.mode,
            factor_is_zero=factor_is_zero,
            sequence_parallel=sequence_parallel,
            allreduce_dgrad=allreduce_dgrad,
            tp_group=self.tp_group,
            factor_scale=self.merge_scale,
            sketch=sketch if self.training else None,
            save_input=self.compression.exact_input,
        )

    def _sharded(self, prefix, sharded_offsets, metadata, axes):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            axes,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class CompactColumnParallelLinear(CompactLinearMixin, ColumnParallelLinear):
    """ColumnParallelLinear (Y = X W^T, W split along its output rows) with CompAct.

    Input [s, b, in] ([s/tp, b, in] with sequence parallelism); output [s, b, out/tp]
    (or [s, b, out] with gather_output). P is the same dense [in, r] matrix on every rank.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        compression: LayerCompression,
        layer_id: Optional[int] = None,
        **kwargs,
    ):
        self._check_arguments(compression, kwargs)
        super().__init__(input_size, output_size, **kwargs)
        self._init_compression(
            compression, layer_id, kwargs.get("tp_comm_buffer_name"), 1, 0, 1, partition_dim=0
        )

    replicated_over_tp = True  # the same dense P on every TP rank

    @property
    def sketch_sum_over_tp(self) -> bool:
        """The sketch sees a TP shard: X's sequence shard (sequence parallel), or G's rows."""
        return self.sequence_parallel or (
            self.sketch is not None and self.sketch.fed_in_backward)

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ):
        if weight is not None:
            raise ValueError("compact layers do not take an external weight in forward")
        bias = self.bias if not self.skip_bias_add else None
        if self.allreduce_dgrad or self.sequence_parallel or self.disable_grad_reduce:
            x = input_  # the TP communication happens inside the compressed function
        else:
            x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        out = self._compressed(x, bias, self.sequence_parallel, self.allreduce_dgrad)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded(prefix, sharded_offsets, metadata,
                             {"weight": 0, "weight_lo": 0, "bias": 0, "subspace_factor": 0})


class CompactRowParallelLinear(CompactLinearMixin, RowParallelLinear):
    """RowParallelLinear (W split along its input columns) with CompAct.

    Input [s, b, in/tp]; output [s, b, out] after the TP all-reduce ([s/tp, b, out] after the
    reduce-scatter with sequence parallelism). P is block-diagonal with
    `row_parallel_blocks` blocks whose seeds use the global block index, and this rank
    draws only the blocks of its input shard, so any TP size dividing the block count
    computes the same math as TP=1.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        compression: LayerCompression,
        layer_id: Optional[int] = None,
        **kwargs,
    ):
        self._check_arguments(compression, kwargs)
        super().__init__(input_size, output_size, **kwargs)
        tp_size, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        blocks = compression.row_parallel_blocks
        if blocks % tp_size:
            raise ValueError(
                f"row_parallel_blocks={blocks} must be divisible by the TP size {tp_size}"
            )
        local = blocks // tp_size
        self._init_compression(
            compression, layer_id, kwargs.get("tp_comm_buffer_name"),
            blocks, tp_rank * local, local, partition_dim=1,
        )

    # each TP rank owns its own blocks, estimated from its own input columns (full sequence)
    replicated_over_tp = False
    sketch_sum_over_tp = False

    def forward(self, input_: torch.Tensor):
        if self.input_is_parallel:
            x = input_
        else:
            x = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        out = self._compressed(x, None, False, False)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded(prefix, sharded_offsets, metadata,
                             {"weight": 1, "weight_lo": 1, "subspace_factor": 1})
