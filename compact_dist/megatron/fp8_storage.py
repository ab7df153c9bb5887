"""Blockwise-scaled FP8 (e4m3) storage of activations kept for backward (lossy).

`pack(x)` -> (payload, scales), `unpack(payload, scales, dtype)` -> x_hat. Used by the
'swiglu' (compact_dist.megatron.swiglu), 'attention' (compact_dist.megatron.attention) and 'norm'
(compact_dist.megatron.norm) options of `ActivationConfig.fp8_storage`: forward computes with the
original tensor, only what backward sees is x_hat.

Format. x [..., n] (bf16, fp16 or fp32, any device) is cut along its last dimension into
blocks of `block` contiguous elements: 128 when n is a multiple of 128, else the whole row
(n elements; e.g. a head_dim of 64). Each block gets one fp32 scale, a power of two:
  scale = 2^k, k the smallest integer with amax <= 448 * 2^k   (448: e4m3's largest finite),
so the block's absolute maximum maps into (224, 448]. payload = e4m3fn(x / scale) (round to
nearest even), same shape as x; scales [..., n / block] fp32.
Why blocks of 128 rather than one scale per row: LLM activations have a few outlier
channels (the residual stream that the norms see has channels 100-1000x the rest); one
scale per 4096-wide row pushes every other channel of that row towards e4m3's subnormals
(relative error up to 100%), a 128-block confines the outlier's effect to its own block.
The scale costs 4 / 128 = 3.1% on top of the 1-byte payload, i.e. 0.516x bf16 storage or
0.258x fp32 (the per-row scale of a head_dim 64 row costs 6.25%).
Why a power of two: x / scale and payload * scale are then exact in fp32 (and the
dequantized value is exact in bf16), so the only error is e4m3's rounding, and the Triton
kernel and the torch path give bit-identical payloads and scales.

Error guarantee (asserted in tests/test_fp8_storage.py), for every finite element x:
  |x_hat - x| <= max(2^-4 |x|, 2^-10 scale),  and so <= 2^-4 amax(block)
(e4m3 has 3 mantissa bits: round-to-nearest is within half an ulp = 2^-4 of the value for
normals; below 2^-6 the subnormal spacing 2^-9 gives 2^-10 absolute, in units of `scale`;
scale < amax / 224, so that term is < 2^-17.8 amax).

Zero blocks: scale 1, payload 0 (exact zeros). Non-finite policy: a block's scale comes
from its finite elements only; a NaN or +-inf element is stored as NaN (e4m3fn has no
infinity) and comes back as NaN, the other elements of its block keep the guarantee above.
Backward of such a step then produces NaN gradients, as the unquantized step would produce
NaN or inf ones; the bf16 training loop skips or fails the step either way.

CUDA: one Triton kernel per direction (`triton` >= 3.0, sm_89+ for the fp8 conversion), one
read of x and one write of the payload; the torch path (any device, and CUDA without
Triton) makes ~8 passes over fp32 temporaries. FP8_STORAGE_TRITON=0 forces the torch path.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # triton 3.x ships with CUDA builds of torch; CPU-only installs lack it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
_MANTISSA_1_75 = 0x600000  # fp32 mantissa bits of 1.75 (448 = 1.75 * 2^8)
_TRITON_MAX_BLOCK = 4096


def block_size(n: int) -> int:
    """Elements per scale for a last dimension of n: 128 if it divides n, else n."""
    return BLOCK if n % BLOCK == 0 else n


def _power_of_two_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """amax (fp32, >= 0, finite) -> (scale, 1 / scale), both exact powers of two, with scale
    the smallest 2^k >= amax / 448 (k clamped to >= -126: fp32 normals), 1 for amax == 0."""
    bits = amax.view(torch.int32)
    k = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > _MANTISSA_1_75).to(torch.int32)
    k = torch.where(amax > 0, k.clamp_min(-126), torch.zeros_like(k))
    scale = ((k + 127) << 23).view(torch.float32)
    inverse = ((127 - k) << 23).view(torch.float32)
    return scale, inverse


def _pack_torch(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x2.float()
    finite = torch.isfinite(xf)
    amax = torch.where(finite, xf.abs(), 0.0).amax(dim=1)
    scale, inverse = _power_of_two_scale(amax)
    y = torch.where(finite, xf * inverse[:, None], float("nan"))
    return y.to(FP8_DTYPE), scale


def _unpack_torch(q2: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q2.float() * scales[:, None]).to(dtype)


if HAVE_TRITON:

    @triton.jit
    def _pack_kernel(x_ptr, q_ptr, s_ptr, n_blocks, BLOCK_N: tl.constexpr,
                     BLOCK_P2: tl.constexpr, ROWS: tl.constexpr):
        # ROWS blocks of BLOCK_N elements per program; x and q are [n_blocks, BLOCK_N]
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_P2)
        row_ok = rows < n_blocks
        mask = row_ok[:, None] & (cols[None, :] < BLOCK_N)
        offs = rows.to(tl.int64)[:, None] * BLOCK_N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        finite = ax < float("inf")  # False for +-inf and NaN
        amax = tl.max(tl.where(finite, ax, 0.0), axis=1)
        bits = amax.to(tl.int32, bitcast=True)
        k = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        k = tl.where(amax > 0, tl.maximum(k, -126), 0)
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
        inverse = ((127 - k) << 23).to(tl.float32, bitcast=True)
        y = (x * inverse[:, None]).to(tl.float8e4nv, fp_downcast_rounding="rtne")
        # q_ptr is the payload's uint8 view: non-finite -> 0x7F, e4m3fn's NaN, explicitly
        # (the conversion would saturate an inf)
        bits = tl.where(finite, y.to(tl.uint8, bitcast=True), 0x7F)
        tl.store(q_ptr + offs, bits, mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_ok)

    @triton.jit
    def _unpack_kernel(q_ptr, s_ptr, y_ptr, n_blocks, BLOCK_N: tl.constexpr,
                       BLOCK_P2: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_P2)
        row_ok = rows < n_blocks
        mask = row_ok[:, None] & (cols[None, :] < BLOCK_N)
        offs = rows.to(tl.int64)[:, None] * BLOCK_N + cols[None, :]
        # q_ptr is the payload's uint8 view; 0x7F / 0xFF (e4m3fn's NaN) decoded explicitly
        bits = tl.load(q_ptr + offs, mask=mask, other=0)
        q = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        q = tl.where((bits & 0x7F) == 0x7F, float("nan"), q)
        scale = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
        tl.store(y_ptr + offs, (q * scale[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


def _launch_shape(block: int) -> tuple[int, int, int]:
    p2 = triton.next_power_of_2(block)
    rows = max(1, 4096 // p2)
    return p2, rows, p2 * rows


def _pack_triton(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_blocks, block = x2.shape
    q = torch.empty_like(x2, dtype=FP8_DTYPE)
    scales = torch.empty(n_blocks, dtype=torch.float32, device=x2.device)
    p2, rows, _ = _launch_shape(block)
    _pack_kernel[(triton.cdiv(n_blocks, rows),)](x2, q.view(torch.uint8), scales, n_blocks,
                                                 block, p2, rows)
    return q, scales


def _unpack_triton(q2: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n_blocks, block = q2.shape
    y = torch.empty_like(q2, dtype=dtype)
    p2, rows, _ = _launch_shape(block)
    _unpack_kernel[(triton.cdiv(n_blocks, rows),)](q2.view(torch.uint8), scales, y, n_blocks,
                                                   block, p2, rows)
    return y


def use_triton(x: torch.Tensor, block: int) -> bool:
    """The Triton kernels run for CUDA tensors on sm_89+ (hardware fp8 conversion; or anything
    under TRITON_INTERPRET=1) with blocks of at most 4096 elements, unless
    FP8_STORAGE_TRITON=0."""
    if not HAVE_TRITON or os.environ.get("FP8_STORAGE_TRITON", "1") == "0":
        return False
    if block > _TRITON_MAX_BLOCK:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


def pack(x: torch.Tensor, block: Optional[int] = None,
         triton_kernel: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] (float, any device) -> payload [..., n] float8_e4m3fn and scales
    [..., n / block] fp32 (powers of two; see the module docstring). block: default
    `block_size(n)`; it must divide n. triton_kernel: None = `use_triton`."""
    if not x.is_floating_point():
        raise TypeError(f"pack needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    block = block_size(n) if block is None else block
    if n % block:
        raise ValueError(f"block {block} does not divide the last dimension {n}")
    x2 = x.contiguous().view(-1, block)
    kernel = use_triton(x, block) if triton_kernel is None else triton_kernel
    q, scales = _pack_triton(x2) if kernel else _pack_torch(x2)
    return q.view(x.shape), scales.view(*x.shape[:-1], n // block)


def unpack(payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
           triton_kernel: Optional[bool] = None) -> torch.Tensor:
    """Inverse of `pack`: payload [..., n] e4m3fn, scales [..., n / block] -> [..., n] in
    `dtype` (exact product payload * scale, rounded once to dtype: exact for bf16/fp32)."""
    n = payload.shape[-1]
    block = n // scales.shape[-1]
    q2, s = payload.contiguous().view(-1, block), scales.contiguous().view(-1)
    kernel = use_triton(payload, block) if triton_kernel is None else triton_kernel
    y = _unpack_triton(q2, s, dtype) if kernel else _unpack_torch(q2, s, dtype)
    return y.view(payload.shape)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """unpack(pack(x)): what backward sees of x."""
    return unpack(*pack(x), x.dtype)


def needs_storage(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd will record the op: grad mode on and some input requires grad.
    Otherwise (eval, no_grad, recompute's first pass) nothing is saved and packing is skipped."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
