"""The compressed linear autograd function shared by both modes and both parallel layouts.

Forward computes Y = X W^T (+ s Z A^T when the subspace factor A may be non-zero; s is the
layer's merge scale) and saves only Z = X P (r columns), plus references to the parameters
and to P's blocks (which the layer keeps for the projection epoch: generated from seeds or
estimated from data; P is never derived from anything this call saves). Backward returns:
  - dX = dY W (+ s (dY A) P^T): exact;
  - subspace mode: A's gradient dY^T Z (= G P, CompAct's compressed gradient; dL/dA / s),
    no grad for W0;
  - unbiased mode: dL/dW = (dY^T Z) P^T (= G P P^T, unbiased as E[P P^T] = I for a Gaussian
    P; the projection of G onto span(P) for an orthonormal P).
With an open sketch (compact_dist.core.basis) the call also feeds the estimate of the next P:
one fed in forward ('pca') adds X^T (X Q0); one fed in backward (`fed_in_backward`:
'gradient', a probe micro-batch) keeps the uncompressed input and adds G^T (G Q0) in
backward. Any probe consumer with `fed_in_backward` gets that G of
this TP shard (fp32): the kept-energy accumulator (compact_dist.core.kept_energy), or both
through GradientConsumers.
save_input (a layer's `exact_input`): save X itself instead of Z and project it in backward;
the gradients are the same. It pays where another op keeps X anyway (linear_proj: SDPA keeps
its output, which is proj's input, as the same storage): Z's bytes are then saved too.

Shapes (s: sequence, b: micro-batch, n/m: in/out features of this TP rank's shard, r: columns
of this rank's P slice): x [s, b, n] (or [s/tp, b, n] with sequence parallelism, gathered
over the TP group inside), weight [m, n], factor [m, r], bias [m], blocks [kb, n/kb, r/kb]
(P's diagonal blocks, in x's dtype; or P as a matrix [n, r]: projection.operand), output
[s, b, m].
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from compact_dist.core.basis import SubspaceSketch
from compact_dist.core.collectives import all_gather_first_dim, reduce_scatter_first_dim
from compact_dist.core.projection import project, unproject

SUBSPACE = "subspace"
UNBIASED = "unbiased"


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without a dispatcher call when it already is (host time counts where the
    step is host-bound: several calls per layer and step)."""
    return t if t.dtype == dtype else t.to(dtype)


class _Settings(NamedTuple):
    """What a call fixes besides its tensors: one argument to autograd's apply instead of six
    (apply walks every argument; host time counts where the step is host-bound)."""

    mode: str
    sequence_parallel: bool
    allreduce_dgrad: bool
    tp_group: Optional[dist.ProcessGroup]
    factor_scale: float
    save_input: bool


class CompressedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        factor: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        blocks: torch.Tensor,
        factor_is_zero: bool,
        sketch: Optional[SubspaceSketch],
        settings: _Settings,
    ) -> torch.Tensor:
        sequence_parallel, save_input = settings.sequence_parallel, settings.save_input
        total_x = all_gather_first_dim(x, settings.tp_group)[0] if sequence_parallel else x
        out = torch.matmul(total_x, _cast(weight, x.dtype).t())
        use_factor = settings.mode == SUBSPACE and not factor_is_zero
        # Z = X P of the local shard: what backward keeps of the input (save_input keeps X
        # instead), and the factor term's input without sequence parallelism
        needs_z = not save_input or (use_factor and not sequence_parallel)
        z = project(x, blocks) if needs_z else None
        if use_factor:
            z_total = project(total_x, blocks) if sequence_parallel else z
            out = out + settings.factor_scale * torch.matmul(z_total, _cast(factor, x.dtype).t())
        if bias is not None:
            out = out + bias
        probe = sketch is not None and sketch.fed_in_backward
        if sketch is not None and not probe:
            sketch.add_input(x)
        ctx.save_for_backward(x if save_input else z, weight, factor if use_factor else None,
                              total_x if probe else None)
        ctx.sketch = sketch if probe else None
        ctx.settings, ctx.use_factor, ctx.use_bias = settings, use_factor, bias is not None
        ctx.blocks = blocks  # P: kept by the layer, not a saved activation
        ctx.factor_dtype = factor.dtype if factor is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, weight, factor, probe_input = ctx.saved_tensors
        settings = ctx.settings
        blocks = _cast(ctx.blocks, grad_out.dtype)
        if settings.save_input:
            z = project(z, _cast(blocks, z.dtype))  # the saved X of this rank's shard -> Z
        gather = None
        if settings.sequence_parallel:
            # all-gather r columns of Z instead of the n columns of X
            z, gather = all_gather_first_dim(z, settings.tp_group, async_op=True)

        grad_in = torch.matmul(grad_out, _cast(weight, grad_out.dtype))
        if ctx.use_factor:
            grad_in = grad_in + settings.factor_scale * unproject(
                torch.matmul(grad_out, _cast(factor, grad_out.dtype)), blocks)

        reduce = None
        if settings.sequence_parallel:
            gather.wait()
            grad_in, reduce = reduce_scatter_first_dim(grad_in, settings.tp_group, async_op=True)
        elif settings.allreduce_dgrad:
            reduce = dist.all_reduce(grad_in, group=settings.tp_group, async_op=True)

        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        g_hat = torch.matmul(g2.t(), z.reshape(-1, z.shape[-1]))  # [m, r] = G P
        grad_weight = grad_factor = None
        if settings.mode == SUBSPACE:
            grad_factor = _cast(g_hat, ctx.factor_dtype)
        else:
            grad_weight = _cast(unproject(g_hat, blocks), weight.dtype)
        grad_bias = g2.sum(dim=0) if ctx.use_bias else None
        if ctx.sketch is not None:  # probe micro-batch: the uncompressed G of this TP shard
            x2 = probe_input.reshape(-1, probe_input.shape[-1])
            ctx.sketch.add_gradient(torch.matmul(g2.t().float(), x2.float()))

        if reduce is not None:
            reduce.wait()
        return grad_in, grad_weight, grad_factor, grad_bias, None, None, None, None


def compressed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    factor: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    blocks: torch.Tensor,
    mode: str,
    factor_is_zero: bool = True,
    sequence_parallel: bool = False,
    allreduce_dgrad: bool = False,
    tp_group: Optional[dist.ProcessGroup] = None,
    factor_scale: float = 1.0,
    sketch: Optional[SubspaceSketch] = None,
    save_input: bool = False,
) -> torch.Tensor:
    """Functional entry point; see the module docstring for shapes and semantics."""
    if mode not in (SUBSPACE, UNBIASED):
        raise ValueError(f"mode must be '{SUBSPACE}' or '{UNBIASED}', got {mode!r}")
    if mode == SUBSPACE and factor is None:
        raise ValueError("subspace mode needs the factor A")
    return CompressedLinearFunction.apply(
        x, weight, factor, bias, blocks, factor_is_zero, sketch,
        _Settings(mode, sequence_parallel, allreduce_dgrad, tp_group, factor_scale, save_input),
    )
