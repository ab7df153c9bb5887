"""Bytes that autograd keeps for backward, measured with saved_tensors_hooks."""

from __future__ import annotations

from typing import Callable

import torch


def saved_activation_bytes(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """Run `fn()` and return the bytes of the tensors autograd saved for backward, not counting
    `module`'s parameters (saved by reference, not copied). Storages are counted once."""
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
