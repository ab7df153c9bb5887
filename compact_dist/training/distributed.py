"""The process set-up of compact-train: the env:// rendezvous address, the world process group
(NCCL on a GPU host, else gloo), DeepSpeed's communication over the same group (with
train.engine=deepspeed only: the FSDP2 path imports no DeepSpeed), Megatron's
tensor- and data-parallel groups and its RNG tracker. Ranks come from the environment
(torchrun, the deepspeed launcher or srun: train_config.world_from_environment)."""

from __future__ import annotations

import os

import torch

from compact_dist.training.train_config import TrainConfig, world_from_environment


def init_distributed(cfg: TrainConfig) -> torch.device:
    """Collective over every rank of the environment's world: the world group, DeepSpeed's
    comm on it (train.engine=deepspeed), Megatron's groups (TP per cfg.parallel, the rest
    data-parallel) and the seeded RNG tracker. Returns this rank's device (cuda:LOCAL_RANK,
    else the CPU)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from compact_dist.core.rng import model_parallel_manual_seed

    rank, local_rank, world = world_from_environment()
    set_rendezvous_address(world)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    if cfg.train.engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)  # DeepSpeed's comm over the same group
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size
    )
    model_parallel_manual_seed(cfg.train.seed)
    return device


def set_rendezvous_address(world_size: int) -> None:
    """MASTER_ADDR / MASTER_PORT of the env:// rendezvous, where the launcher set none.

    A single process listens on a port the OS reports free, so two one-process runs on one
    host do not both take 29500; several processes must agree on the port without talking,
    so they keep the fixed 29500 (every launcher here sets its own)."""
    import socket

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in os.environ:
        return
    if world_size > 1:
        os.environ["MASTER_PORT"] = "29500"
        return
    with socket.socket() as s:
        s.bind(("", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
