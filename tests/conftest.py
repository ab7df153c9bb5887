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


@pytest.fixture(scope="session")
def dp2_runs(tmp_path_factory):
    """test_train.small's 4-step job at DP=2 (TP=1), run once for the session in one launch
    of 2 processes: torch DDP's reference ("ddp") and compact-train at ZeRO-1, 2, 3 ("z1",
    "z2", "z3"; z1 is the default job). {name: history}; test_train and test_fsdp compare
    against it."""
    from test_train import small, train_many

    tmp = tmp_path_factory.mktemp("dp2_runs")
    overrides = small(tmp)
    return train_many(2, [("ddp", overrides)] + [
        (f"z{stage}", overrides + [f"train.zero_stage={stage}"]) for stage in (1, 2, 3)], tmp)
