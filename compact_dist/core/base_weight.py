"""The frozen base W0 of a compact layer in subspace mode: its storage dtype.

`weight` holds W0 (requires_grad=False) in `base_dtype`: fp32, bf16, or the bf16 pair, where
W0 = `weight` (bf16, what forward multiplies with) + the buffer `weight_lo` (bf16, the rest).
The storage dtype survives module.to() / .bfloat16() / .cuda() (`apply_keeping_base`).
Shapes: column-parallel [out/tp, in], row-parallel [out, in/tp].
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# the dtype of `weight` (W0, or the pair's high word) per base_dtype
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16_pair": torch.bfloat16}


def freeze_base(weight: torch.nn.Parameter, base_dtype: str) -> Optional[torch.Tensor]:
    """Make `weight` the frozen W0 in `base_dtype`'s storage; returns the pair's low word
    (bf16, W0 - weight) for 'bf16_pair', else None."""
    weight.requires_grad_(False)
    full = weight.data
    weight.data = full.to(BASE_DTYPES[base_dtype])
    if base_dtype == "bf16_pair":
        return (full.float() - weight.data.float()).to(torch.bfloat16)
    return None


def full_base(weight: torch.Tensor, low: Optional[torch.Tensor]) -> torch.Tensor:
    """W0 in fp32 (the pair: high + low word)."""
    w = weight.float()
    return w if low is None else w + low.float()


def apply_keeping_base(module: torch.nn.Module, apply: Callable, fn, recurse: bool):
    """Module._apply (`apply`, the parent class's) that keeps `weight` and the buffer
    `weight_lo` in their storage dtype: only their device follows `fn`."""
    kept = [(module._parameters, "weight")]
    if module._buffers.get("weight_lo") is not None:
        kept.append((module._buffers, "weight_lo"))
    saved = [(table, name, list(table), table.pop(name)) for table, name in kept]
    try:
        apply(fn, recurse)
    finally:
        for table, name, order, tensor in saved:
            tensor.data = tensor.data.to(fn(torch.empty(0, device=tensor.device)).device)
            rebuilt = {k: (tensor if k == name else table[k]) for k in order}
            table.clear()
            table.update(rebuilt)
    return module
