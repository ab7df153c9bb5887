"""Stochastic rounding of the merge W0 <- W0 (1 - lr wd) + s A P^T into a bf16 W0.

`merge_into_bf16_(base, delta, scale, decay, seed)` updates a bf16 tensor in place:
v = base * decay + scale * delta in fp32, rounded to one of its two bf16 neighbours with
probability proportional to the distance (unbiased: E[round(v)] = v). The noise is a function
of (seed, element index) only, so data-parallel replicas that merge the same values with the
same seed stay bit-identical.

The bf16 pair (`base_dtype: bf16_pair`, the `low` argument) stores W0 as two bf16 words,
W0 = base + low: v = (base + low) * decay + scale * delta, base <- v rounded to nearest
(the bf16 operand the GEMMs read, what an fp32 W0 would be cast to) and low <- the rest
v - base, stochastically rounded. 4 bytes per element like fp32, about 16 significant bits
(the rest's rounding error is <= 2^-8 of |v - base| <= 2^-9 |v|) and unbiased.

Two implementations of the same rule:
- torch (any device): fp32 temporaries and a torch.Generator stream (`stochastic_round_to_bf16`);
- Triton (CUDA): one fused pass that reads W0 and delta and writes W0 (6 bytes per element
  with a bf16 delta, 10 for the pair, against ~70 for the torch chain), Philox noise from
  (seed, index); one kernel serves one W0 or many of one size (`merge_into_bf16_many_`: one
  launch, a table of their addresses and seeds), with the same bits either way.
The two draw different noise (both unbiased); a run uses one of them throughout (the Triton one
whenever W0 is on a CUDA device and triton imports; COMPACT_SR_TRITON=0 forces torch).
Shapes: base, low [numel] (flat bf16 views or slices of W0's words), delta [numel] (any float
dtype).
"""

from __future__ import annotations

import os
from typing import Optional

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
                              PAIR: tl.constexpr, BLOCK: tl.constexpr):
        # for the W0 of program_id(1), whose high-word address, low-word address (PAIR) and
        # 32-bit seed are that row of the int64 table [L, 3] (one W0 or many of one size: the
        # same bits either way): v = (w [+ w_low]) * decay + scale * d; bf16 W0: w <- SR(v);
        # pair: w <- RNE(v), w_low <- SR(v - w), Philox noise of (seed, index) either way
        pid = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)
        row = table_ptr + 3 * layer
        base_ptr = tl.load(row).to(tl.pointer_type(tl.bfloat16))
        seed = tl.load(row + 2).to(tl.int32)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PAIR:
            low_ptr = tl.load(row + 1).to(tl.pointer_type(tl.bfloat16))
            w += tl.load(low_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(delta_ptr + layer * delta_stride + offs, mask=mask, other=0.0).to(tl.float32)
        v = w * decay + scale * d
        out_ptr = base_ptr
        if PAIR:
            # round to nearest even on the bits (the same on every backend): the GEMMs' operand
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            high = bits.to(tl.float32, bitcast=True)
            tl.store(base_ptr + offs, high.to(tl.bfloat16), mask=mask)
            v = v - high  # exact in fp32
            out_ptr = low_ptr
        noise = tl.randint(seed, offs) & 0xFFFF
        bits = v.to(tl.int32, bitcast=True) + noise.to(tl.int32)
        rounded = (bits & -65536).to(tl.float32, bitcast=True)
        tl.store(out_ptr + offs, rounded.to(tl.bfloat16), mask=mask)


def _seed32(seed: int) -> int:
    """Philox takes a 32-bit seed in tl.randint: fold the 63-bit stream id."""
    return (seed ^ (seed >> 32)) & 0x7FFFFFFF


def merge_into_bf16_many_(bases: list[torch.Tensor], deltas: torch.Tensor, scale: float,
                          decay: float, seeds: list[int],
                          lows: Optional[list[torch.Tensor]] = None) -> None:
    """merge_into_bf16_(bases[i], deltas[i], scale, decay, seeds[i], lows[i]) for every i, the
    same bits; with Triton one kernel for all (bases, lows: 1-D bf16 tensors of one length n,
    deltas [len(bases), n], rows contiguous)."""
    n = deltas.shape[1] if deltas.dim() == 2 else -1
    words = bases + (lows or [])
    if (deltas.shape[0] != len(bases) or len(seeds) != len(bases)
            or (lows is not None and len(lows) != len(bases))
            or any(b.dtype != torch.bfloat16 or b.shape != (n,) for b in words)):
        raise ValueError("merge_into_bf16_many_ needs 1-D bf16 bases (and lows) of one length "
                         "n, deltas [len(bases), n] and a seed per base")
    if not bases or not n:
        return
    if not (triton_available(bases[0]) and all(b.is_contiguous() for b in words)):
        for i, (base, delta, seed) in enumerate(zip(bases, deltas, seeds)):
            merge_into_bf16_(base, delta, scale, decay, seed, None if lows is None else lows[i])
        return
    _launch(bases, lows, deltas, scale, decay, seeds)


def _launch(bases: list[torch.Tensor], lows: Optional[list[torch.Tensor]],
            deltas: torch.Tensor, scale: float, decay: float, seeds: list[int]) -> None:
    """The Triton kernel over contiguous bf16 bases (and lows) of one length, deltas [L, n]."""
    rows = [[b.data_ptr(), 0 if lows is None else lows[i].data_ptr(), _seed32(s)]
            for i, (b, s) in enumerate(zip(bases, seeds))]
    table = torch.tensor(rows, dtype=torch.int64).to(bases[0].device, non_blocking=True)
    n, block = bases[0].numel(), 4096
    grid = (triton.cdiv(n, block), len(bases))
    if deltas.stride(1) != 1:
        deltas = deltas.contiguous()
    _merge_sr_many_kernel[grid](table, deltas, n, deltas.stride(0), float(scale), float(decay),
                                PAIR=lows is not None, BLOCK=block)


def merge_into_bf16_(base: torch.Tensor, delta: torch.Tensor, scale: float, decay: float,
                     seed: int, low: Optional[torch.Tensor] = None,
                     generator_device: torch.device | None = None) -> None:
    """base (bf16, contiguous 1-D) <- SR(base * decay + scale * delta); with `low` (the pair's
    low word, shaped like base): v = (base + low) * decay + scale * delta, base <- RNE(v),
    low <- SR(v - base). See the module doc."""
    if (base.dtype != torch.bfloat16 or base.dim() != 1 or delta.shape != base.shape
            or (low is not None and (low.dtype != torch.bfloat16 or low.shape != base.shape))):
        raise ValueError("merge_into_bf16_ needs a 1-D bf16 base (and low) and a delta of its "
                         "shape")
    if not base.numel():
        return
    if triton_available(base) and base.is_contiguous() and (low is None or low.is_contiguous()):
        _launch([base], None if low is None else [low], delta.reshape(1, -1), scale, decay,
                [seed])
        return
    merged = base.float()
    if low is not None:
        merged.add_(low.float())
    if decay != 1.0:
        merged.mul_(decay)
    merged.add_(delta, alpha=scale)
    gen = torch.Generator(device=generator_device or base.device)
    gen.manual_seed(seed)
    if low is None:
        base.copy_(stochastic_round_to_bf16(merged, gen))
        return
    base.copy_(merged)  # round to nearest even
    low.copy_(stochastic_round_to_bf16(merged.sub_(base.float()), gen))
