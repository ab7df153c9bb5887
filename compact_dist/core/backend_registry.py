"""Which parallel backend holds a model's subspace factors: the one place that chooses.

Backends are considered newest registration first; the first that claims the optimizer or
the factors answers, else the plain torch backend (compact_dist.core.torch_backend), which
raises where the optimizer steps neither A nor a master copy it knows, so a factor held by
an engine whose backend is not registered is an error, never merged as a plain one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from compact_dist.core.backend import ParallelBackend
from compact_dist.core.torch_backend import TORCH_BACKEND

_REGISTERED: list[ParallelBackend] = []


def register_backend(backend: ParallelBackend) -> None:
    """Consider `backend` in backend_for, before those registered earlier (once per type)."""
    if not any(type(b) is type(backend) for b in _REGISTERED):
        _REGISTERED.insert(0, backend)


def registered_backends() -> tuple[ParallelBackend, ...]:
    return tuple(_REGISTERED)


def backend_for(optimizer=None, factors: Sequence[torch.Tensor] = ()) -> ParallelBackend:
    """The backend holding `factors` (the subspace factors A) and `optimizer` (what the
    training loop steps; None: not given)."""
    for backend in _REGISTERED:
        if backend.claims(optimizer, factors):
            return backend
    return TORCH_BACKEND
