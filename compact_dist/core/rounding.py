"""Stochastic rounding of the merge W0 <- W0 (1 - lr wd) + s A P^T into a bf16 W0.

`merge_into_bf16_(base, delta, scale, decay, seed)` updates a bf16 tensor in place:
v = base * decay + scale * delta in fp32, rounded to one of its two bf16 neighbours with
probability proportional to the distance (unbiased: E[round(v)] = v). The noise is a function
of (seed, element index) only, so data-parallel replicas that merge the same values with the
same seed stay bit-identical.

Two implementations of the same rule:
- torch (any device): fp32 temporaries and a torch.Generator stream (`stochastic_round_to_bf16`);
- Triton (CUDA): one fused pass that reads W0 and delta and writes W0 (6 bytes per element
  with a bf16 delta, against ~70 for the torch chain), Philox noise from (seed, index);
  one kernel serves one W0 or many of one size (`merge_into_bf16_many_`: one launch, a table
  of their addresses and seeds), with the same bits either way.
The two draw different noise (both unbiased); a run uses one of them throughout (the Triton one
whenever W0 is on a CUDA device and triton imports; COMPACT_SR_TRITON=0 forces torch).
Shapes: base [numel] (a flat bf16 view or slice of W0), delta [numel] (any float dtype).
"""

from __future__ import annotations

import os

import torch

try:  # triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round fp32 `x` to bf16 up or down with probability proportional to the distance."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, generator=generator, device=x.device, dtype=torch.int32
    )
    rounded = (bits + noise) & -65536  # clear the 16 bits bf16 drops
    return rounded.view(torch.float32).to(torch.bfloat16)


def triton_available(t: torch.Tensor) -> bool:
    return (triton is not None and t.is_cuda
            and os.environ.get("COMPACT_SR_TRITON", "1") != "0")


if triton is not None:

    @triton.jit
    def _merge_sr_many_kernel(table_ptr, delta_ptr, n, delta_stride, scale, decay,
                              BLOCK: tl.constexpr):
        # v = w * decay + scale * d rounded with Philox noise of (seed, index), for the W0
        # of program_id(1), whose address and 32-bit seed are that row of the int64 table
        # [L, 2] (one W0 or many of one size: the same bits either way)
        pid = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)
        base_ptr = tl.load(table_ptr + 2 * layer).to(tl.pointer_type(tl.bfloat16))
        seed = tl.load(table_ptr + 2 * layer + 1).to(tl.int32)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(delta_ptr + layer * delta_stride + offs, mask=mask, other=0.0).to(tl.float32)
        v = w * decay + scale * d
        noise = tl.randint(seed, offs) & 0xFFFF
        bits = v.to(tl.int32, bitcast=True) + noise.to(tl.int32)
        rounded = (bits & -65536).to(tl.float32, bitcast=True)
        tl.store(base_ptr + offs, rounded.to(tl.bfloat16), mask=mask)


def _seed32(seed: int) -> int:
    """Philox takes a 32-bit seed in tl.randint: fold the 63-bit stream id."""
    return (seed ^ (seed >> 32)) & 0x7FFFFFFF


def merge_into_bf16_many_(bases: list[torch.Tensor], deltas: torch.Tensor, scale: float,
                          decay: float, seeds: list[int]) -> None:
    """merge_into_bf16_(bases[i], deltas[i], scale, decay, seeds[i]) for every i, the same
    bits; with Triton one kernel for all (bases: 1-D bf16 tensors of one length n, deltas
    [len(bases), n], rows contiguous)."""
    n = deltas.shape[1] if deltas.dim() == 2 else -1
    if (deltas.shape[0] != len(bases) or len(seeds) != len(bases)
            or any(b.dtype != torch.bfloat16 or b.shape != (n,) for b in bases)):
        raise ValueError("merge_into_bf16_many_ needs 1-D bf16 bases of one length n, deltas "
                         "[len(bases), n] and a seed per base")
    if not bases or not n:
        return
    if not (triton_available(bases[0]) and all(b.is_contiguous() for b in bases)):
        for base, delta, seed in zip(bases, deltas, seeds):
            merge_into_bf16_(base, delta, scale, decay, seed)
        return
    _launch(bases, deltas, scale, decay, seeds)


def _launch(bases: list[torch.Tensor], deltas: torch.Tensor, scale: float, decay: float,
            seeds: list[int]) -> None:
    """The Triton kernel over contiguous bf16 bases of one length and deltas [L, n]."""
    table = torch.tensor([[b.data_ptr(), _seed32(s)] for b, s in zip(bases, seeds)],
                         dtype=torch.int64).to(bases[0].device, non_blocking=True)
    n, block = bases[0].numel(), 4096
    grid = (triton.cdiv(n, block), len(bases))
    if deltas.stride(1) != 1:
        deltas = deltas.contiguous()
    _merge_sr_many_kernel[grid](table, deltas, n, deltas.stride(0), float(scale), float(decay),
                                BLOCK=block)


def merge_into_bf16_(base: torch.Tensor, delta: torch.Tensor, scale: float, decay: float,
                     seed: int, generator_device: torch.device | None = None) -> None:
    """base (bf16, contiguous 1-D) <- SR(base * decay + scale * delta); see the module doc."""
    if base.dtype != torch.bfloat16 or base.dim() != 1 or delta.shape != base.shape:
        raise ValueError("merge_into_bf16_ needs a 1-D bf16 base and a delta of its shape")
    if not base.numel():
        return
    if triton_available(base) and base.is_contiguous():
        _launch([base], delta.reshape(1, -1), scale, decay, [seed])
        return
    merged = base.float()
    if decay != 1.0:
        merged.mul_(decay)
    merged.add_(delta, alpha=scale)
    gen = torch.Generator(device=generator_device or base.device)
    gen.manual_seed(seed)
    base.copy_(stochastic_round_to_bf16(merged, gen))
