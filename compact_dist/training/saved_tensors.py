"""What autograd saves for backward during a forward, per storage, with the code site and the
transformer layer that saved it (compact-memory's measurement; compact-train's start-up ratio).
Imports nothing of the training loop, so training and tools can both use it."""

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
    compact_dist.tools.memory.saved_activation_bytes: returning the tensor itself leaks the graph)."""
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
