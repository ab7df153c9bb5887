"""Model-parallel RNG seeding that also works without CUDA.

On GPUs this is Megatron's `model_parallel_cuda_manual_seed`. Megatron's tracker and its
checkpoint replay read and write *CUDA* generator states; on a CPU-only machine (CI, the
gloo tests, CPU training runs) `install_cpu_rng_tracker` gives Megatron a tracker with the same
interface over CPU generator states and points its private state get/set helpers at the CPU
generator, so dropout forks and `tensor_parallel.checkpoint` recompute replay still work.
It is never installed when CUDA is available.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mpu_random


class CpuRNGStatesTracker(mpu_random.CudaRNGStatesTracker):
    """Megatron's named RNG states, held as CPU generator states."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_rng_tracker() -> None:
    if torch.cuda.is_available():
        raise RuntimeError("the CPU RNG tracker is only for machines without CUDA")
    if isinstance(mpu_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        return
    mpu_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mpu_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default and the tensor/expert-parallel RNG states like Megatron does."""
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        install_cpu_rng_tracker()
    mpu_random.model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def rng_untouched():
    """Run the body and restore every RNG state it may draw from: the default CPU generator,
    the current CUDA device's, and Megatron's tracker states (dropout). A probe forward
    inside it leaves the training run's random stream as if it had not run."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    tracker = (mpu_random._CUDA_RNG_STATE_TRACKER
               if mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED else None)
    states = tracker.get_states() if tracker is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        if states is not None:
            tracker.set_states(states)
