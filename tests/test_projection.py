import torch
import pytest

from compact_dist.core.projection import (
    DENSE_MAX_BLOCKS, Projection, block_seed, operand, project, unproject,
)

CPU = torch.device("cpu")


def test_projection_is_a_pure_function_of_its_four_numbers():
    p = Projection(seed=7, layer_id=3, in_features=64, rank=16, num_blocks=4, local_blocks=4)
    torch.manual_seed(0)
    a = p.blocks(epoch=2, device=CPU, dtype=torch.float32)
    ambient = torch.get_rng_state()
    torch.randn(1000)  # consume ambient randomness: must not matter
    b = p.blocks(epoch=2, device=CPU, dtype=torch.float32)
    assert torch.equal(a, b)
    # and generating P must not touch the ambient generator
    state = torch.get_rng_state()
    p.blocks(epoch=2, device=CPU, dtype=torch.float32)
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(ambient, state)
    # each of seed, layer id, epoch changes P
    for other in (
        Projection(8, 3, 64, 16, 4, 0, 4).blocks(2, CPU, torch.float32),
        Projection(7, 4, 64, 16, 4, 0, 4).blocks(2, CPU, torch.float32),
        p.blocks(3, CPU, torch.float32),
    ):
        assert not torch.allclose(a, other)
    # blocks differ from each other (seeded by the global block index)
    assert not torch.allclose(a[0], a[1])
    assert len({block_seed(7, 3, 2, i) for i in range(4)}) == 4


def test_row_parallel_slices_equal_the_tp1_matrix():
    full = Projection(1, 0, 64, 32, num_blocks=8, first_block=0, local_blocks=8)
    dense = full.matrix(0, CPU, torch.float32)
    assert dense.shape == (64, 32)
    for tp in (2, 4, 8):
        local = 8 // tp
        for rank in range(tp):
            shard = Projection(1, 0, 64, 32, 8, rank * local, local).matrix(0, CPU, torch.float32)
            rows = slice(rank * 64 // tp, (rank + 1) * 64 // tp)
            cols = slice(rank * 32 // tp, (rank + 1) * 32 // tp)
            assert torch.equal(shard, dense[rows, cols])
            # off-diagonal parts of the global P are zero
            assert dense[rows, :cols.start].abs().sum() == 0


def test_project_and_unproject_match_dense_matmul():
    for blocks in (1, 2, 4):
        p = Projection(3, 1, 32, 8, num_blocks=blocks, local_blocks=blocks)
        b = p.blocks(0, CPU, torch.float64)
        dense = p.matrix(0, CPU, torch.float64)
        x = torch.randn(5, 2, 32, dtype=torch.float64)
        y = torch.randn(6, 8, dtype=torch.float64)
        # the blocks and the operand forward multiplies with (a matrix up to DENSE_MAX_BLOCKS)
        op = operand(b)
        assert op.dim() == (2 if blocks <= DENSE_MAX_BLOCKS else 3)
        for form in (b, op):
            torch.testing.assert_close(project(x, form), x @ dense)
            torch.testing.assert_close(unproject(y, form), y @ dense.t())
        if blocks <= DENSE_MAX_BLOCKS:
            torch.testing.assert_close(op, dense, rtol=0, atol=0)


@pytest.mark.parametrize("blocks", [1, 4])
def test_gaussian_scale_gives_identity_in_expectation(blocks):
    n, r = 16, 8
    acc = torch.zeros(n, n, dtype=torch.float64)
    draws = 400
    for epoch in range(draws):
        P = Projection(0, 0, n, r, blocks, 0, blocks).matrix(epoch, CPU, torch.float64)
        acc += P @ P.t()
    mean = acc / draws
    # E[P P^T] = I (entries of each block ~ N(0, 1 / block_rank)); 400 draws: ~0.1 noise
    assert (mean - torch.eye(n, dtype=torch.float64)).abs().max() < 0.35
    assert (torch.diagonal(mean) - 1).abs().mean() < 0.1
    P = Projection(0, 0, 256, 64, blocks, 0, blocks).matrix(0, CPU, torch.float64)
    nonzero = P[P != 0]
    assert abs(nonzero.var().item() * (64 // blocks) - 1.0) < 0.1


def test_projection_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal diagonal blocks"):
        Projection(0, 0, 30, 8, num_blocks=4)
    with pytest.raises(ValueError, match="not within"):
        Projection(0, 0, 32, 8, num_blocks=4, first_block=3, local_blocks=2)
