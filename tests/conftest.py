"""Shared fixtures: a one-process gloo group with Megatron's parallel state at TP=1."""

import os
import socket
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_tp1():
    """TP=1 parallel state over a single-process gloo group (created once per session)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from compact_dist.core.rng import model_parallel_manual_seed

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1)
    model_parallel_manual_seed(1234)
    yield parallel_state
