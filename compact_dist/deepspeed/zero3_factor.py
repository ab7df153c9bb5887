"""ZeRO-3: the subspace factor A outside DeepSpeed's per-module parameter fetch.

Under ZeRO-3 DeepSpeed gathers every parameter a module lists (`named_parameters(recurse=
False)`) before the module's forward and again before its backward, and frees it after each.
In the training contract (merge after every optimizer step) A is zero in both, so those
gathers only move A's bytes (a quarter of W0's at r = n/4) and cost DeepSpeed's
per-parameter host work: at 1.3B, DP=4, the 96 A's made its pre/post-backward hooks take
127 instead of 79 ms of host time per step and the step 1.149x the ZeRO-3 baseline's; 0.999x
without them (benchmarks/results/steptime_dp4_z3_1.3b{_before,}).

`keep_factors_out_of_fetch` (called by initialize_engine at stage 3) takes A out of the
layer's own listing (the model's recursive listing, which the optimizer, ZeRO's partitioning
and checkpoints use, keeps it) and sets the layer's `forward_factor_hook` to `forward_factor`,
which hands autograd:
  - A known zero, with grad: a zero-stride stand-in of A's full shape [out, r] as A's data
    (no memory; forward and backward never read A then): autograd records that shape, so
    A's gradient [out, r] reaches A's AccumulateGrad and DeepSpeed's reduction hook as when
    DeepSpeed gathered A;
  - A known zero, without grad (evaluation): A as it is (nothing records it);
  - A not known zero (between engine.step() and the merge, after a checkpoint load): A
    gathered by the layer (`A.all_gather()`: every rank runs the same forward), so forward
    adds the exact A P^T term;
  - A held whole by DeepSpeed (a persistent parameter): A as it is.
`release` (a post-accumulate-grad hook on A, after DeepSpeed's, and the merge) puts A back to
DeepSpeed's empty placeholder, or partitions an A the layer gathered.
"""

from __future__ import annotations

import torch

from compact_dist.core.subspace import compact_layers

_STANDIN_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _status():
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return ZeroParamStatus


def _standin(factor: torch.nn.Parameter) -> torch.Tensor:
    """A zero-stride zero tensor of A's full shape (one shared element per dtype/device)."""
    key = (factor.dtype, factor.ds_tensor.device)
    zero = _STANDIN_ZEROS.get(key)
    if zero is None:
        zero = _STANDIN_ZEROS[key] = torch.zeros((), dtype=key[0], device=key[1])
    return zero.expand(factor.ds_shape)


def forward_factor(factor: torch.nn.Parameter, factor_is_zero: bool) -> torch.nn.Parameter:
    """A as the layer's forward passes it to autograd (see the module docstring)."""
    if factor.ds_status != _status().NOT_AVAILABLE:
        return factor  # held whole (persistent) or already gathered
    if not factor_is_zero:
        factor.all_gather()
    elif torch.is_grad_enabled() and factor.requires_grad:
        factor.data = _standin(factor)
    return factor


def release(factor: torch.nn.Parameter) -> None:
    """A back to DeepSpeed's partitioned state: the stand-in replaced by the empty placeholder
    DeepSpeed keeps in a partitioned parameter, an A the layer gathered partitioned (its
    partition is unchanged); a persistent A stays whole."""
    if factor.ds_status == _status().AVAILABLE:
        if not (factor.ds_persist or factor.ds_active_sub_modules):  # else DeepSpeed's
            factor.partition()
    elif factor.numel():
        factor.data = torch.empty(0, dtype=factor.dtype, device=factor.ds_tensor.device)


def keep_factors_out_of_fetch(model: torch.nn.Module) -> int:
    """Take every ZeRO-3 partitioned A of `model` out of DeepSpeed's per-module fetch (after
    deepspeed.initialize); returns how many."""
    count = 0
    for layer in compact_layers(model):
        factor = layer.factor_parameter()
        if factor is None or not hasattr(factor, "ds_id") or layer.forward_factor_hook:
            continue
        layer.forward_factor_hook = forward_factor
        factor.register_post_accumulate_grad_hook(release)
        count += 1
    return count

