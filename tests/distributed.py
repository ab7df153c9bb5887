"""Run a test body in N gloo processes with Megatron's parallel state (spawned, CPU)."""

from __future__ import annotations

import os
import warnings

import torch.multiprocessing as mp

from conftest import free_port


def _worker(rank, world_size, port, tp, fn, args):
    warnings.filterwarnings("ignore")
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from compact_dist.core.rng import model_parallel_manual_seed

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        model_parallel_manual_seed(1234)
        fn(rank, *args)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, tp: int | None = None) -> None:
    """Run fn(rank, *args) on `world_size` processes; an assertion in any one fails the test."""
    mp.start_processes(
        _worker,
        args=(world_size, free_port(), tp or world_size, fn, args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )


def _raw_worker(rank, world_size, port, fn, args, cuda=False):
    """Only the environment a launcher sets; the body initialises everything itself. Without
    `cuda` the process sees no GPU (CPU, gloo, DeepSpeed's CPU accelerator, also on a GPU
    machine); with it, GPU `rank` and DeepSpeed's CUDA accelerator."""
    warnings.filterwarnings("ignore")
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cuda" if cuda else "cpu",
                      RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        import torch.distributed as dist
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed_raw(fn, world_size: int, *args, cuda: bool = False) -> None:
    """Run fn(rank, *args) in `world_size` spawned processes that only have launcher env
    (on CPU unless `cuda`)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not cuda:  # in the children's environment from their start (imports may probe CUDA)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        mp.start_processes(_raw_worker, args=(world_size, free_port(), fn, args, cuda),
                           nprocs=world_size, join=True, start_method="spawn")
    finally:
        if hidden is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
