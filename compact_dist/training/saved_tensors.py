"""What autograd saves for backward during a forward: the total bytes (`saved_activation_bytes`,
compact-train's per-linear start-up table and the tests' memory checks) and, per storage, the
code site and transformer layer that saved it (`record_saved_tensors`, compact-memory's
measurement and compact-train's start-up ratio). Imports nothing of the training loop, so
training and tools can both use it."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Optional

import torch

_ROOTS = (f"{os.sep}megatron{os.sep}", f"{os.sep}compact_dist{os.sep}")
_SELF = os.path.abspath(__file__)


@dataclasses.dataclass
class SavedTensor:
    site: str                  # "file.py:line qualified.function"
    layer: Optional[int]       # 0-based transformer layer, None outside the layers
    shape: tuple
    dtype: str
    nbytes: int                # storage bytes (counted at the first tensor that saves it)


def saved_activation_bytes(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """Run `fn()` and return the bytes of the tensors autograd saved for backward, not counting
    `module`'s parameters (saved by reference, not copied). Storages are counted once.

    The hook keeps a detached alias, never the tensor itself: a pack hook that returns an
    op's own output (softmax, exp, ...) stores output -> grad_fn -> saved output, a C++
    reference cycle that Python's gc cannot see, and the whole graph of `fn()` would stay
    allocated (at 1.3B: ~4.5 GiB per measured sequence, held for the rest of the process)."""
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _site() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if any(root in name for root in _ROOTS) and os.path.abspath(name) != _SELF:
            code = frame.f_code
            qual = getattr(code, "co_qualname", code.co_name)
            return f"{os.path.basename(name)}:{frame.f_lineno} {qual}"
        frame = frame.f_back
    return "<outside megatron/compact_dist>"


def record_saved_tensors(fn: Callable[[], object], module: torch.nn.Module) -> list[SavedTensor]:
    """Run `fn()` and return one record per storage autograd saved for backward, excluding
    `module`'s parameters. The transformer layer is tracked with forward hooks on
    `module.decoder.layers` (when present). The hook keeps detached aliases (see
    saved_activation_bytes: returning the tensor itself leaks the graph)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()
    records: list[SavedTensor] = []
    current: list[int] = []
    handles = []
    layers = getattr(getattr(module, "decoder", None), "layers", None) or []

    def enter(index: int):
        def hook(mod, args) -> None:
            current.append(index)
        return hook

    def leave(mod, args, out) -> None:
        current.pop()

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(index)))
        handles.append(layer.register_forward_hook(leave))

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            records.append(SavedTensor(_site(), current[-1] if current else None,
                                       tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                       storage.nbytes()))
        return t.detach()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return records
