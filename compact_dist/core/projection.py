"""Seeded Gaussian random projection P (n x r): a pure function of its seeds, which a layer
draws once per projection epoch and keeps until the next resample (CompactLinearMixin
.projection_blocks); data-aware projections are in compact_dist.core.basis.

P is block-diagonal: `num_blocks` blocks of shape (n / num_blocks, r / num_blocks) with entries
N(0, 1 / (r / num_blocks)), so E[P P^T] = I. A dense P (the paper's) is the one-block case and
has entries N(0, 1/r). Each block is drawn from its own generator whose seed is a hash of
(seed, layer id, resample epoch, *global* block index): P is a pure function of those four
numbers, independent of the ambient RNG state (which Megatron's recompute and activation
checkpointing replay), and a tensor-parallel rank that owns blocks [first_block, ...) draws
exactly the blocks that rank 0 of a TP=1 run would draw for those columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct

import torch


def block_seed(seed: int, layer_id: int, epoch: int, block: int) -> int:
    """63-bit generator seed of one projection block."""
    payload = struct.pack("<4q", seed, layer_id, epoch, block)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


@dataclasses.dataclass(frozen=True)
class Projection:
    """The slice of a layer's block-diagonal projection owned by one tensor-parallel rank.

    Attributes:
        seed, layer_id: identify the layer's random stream.
        in_features: global n (input columns of the full, unsharded weight).
        rank: global r.
        num_blocks: diagonal blocks of the global P (1 = dense P).
        first_block, local_blocks: the blocks this rank owns (all of them for a dense P or a
            column-parallel layer, whose input is not sharded).
    """

    seed: int
    layer_id: int
    in_features: int
    rank: int
    num_blocks: int = 1
    first_block: int = 0
    local_blocks: int = 1

    def __post_init__(self) -> None:
        if self.in_features % self.num_blocks or self.rank % self.num_blocks:
            raise ValueError(
                f"P of shape ({self.in_features}, {self.rank}) does not split into "
                f"{self.num_blocks} equal diagonal blocks"
            )
        if not 0 <= self.first_block < self.first_block + self.local_blocks <= self.num_blocks:
            raise ValueError(
                f"blocks [{self.first_block}, {self.first_block + self.local_blocks}) are not "
                f"within the {self.num_blocks} blocks of P"
            )

    @property
    def block_in(self) -> int:
        return self.in_features // self.num_blocks

    @property
    def block_rank(self) -> int:
        return self.rank // self.num_blocks

    @property
    def local_in(self) -> int:
        """Input columns this rank projects (n for dense, n / TP for a row-parallel shard)."""
        return self.local_blocks * self.block_in

    @property
    def local_rank(self) -> int:
        """Columns of this rank's compressed activation Z."""
        return self.local_blocks * self.block_rank

    def blocks(self, epoch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """This rank's diagonal blocks, shape [local_blocks, block_in, block_rank], on `device`.

        Drawn in fp32 (so every dtype sees the same numbers up to rounding), then cast.
        """
        std = 1.0 / math.sqrt(self.block_rank)
        out = torch.empty(
            self.local_blocks, self.block_in, self.block_rank, device=device, dtype=torch.float32
        )
        gen = torch.Generator(device=device)
        for i in range(self.local_blocks):
            gen.manual_seed(block_seed(self.seed, self.layer_id, epoch, self.first_block + i))
            torch.randn(
                self.block_in, self.block_rank, generator=gen, device=device, out=out[i]
            )
        out.mul_(std)
        return out.to(dtype)

    def matrix(self, epoch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """This rank's slice of P as a dense [local_in, local_rank] matrix (for references)."""
        return torch.block_diag(*self.blocks(epoch, device, dtype).unbind(0))


# A block-diagonal P of at most this many blocks is multiplied as one dense matrix (zeros off
# the diagonal): one GEMM of at most DENSE_MAX_BLOCKS x the blocks' flops instead of a batched
# GEMM plus a copy of its transposed output, i.e. fewer launches and host work where the step is
# host-bound (row-parallel layers at TP >= 4, whose GEMMs are small).
DENSE_MAX_BLOCKS = 2


def operand(blocks: torch.Tensor) -> torch.Tensor:
    """P in the form `project` / `unproject` multiply fastest: the [n, r] matrix itself for a
    single block (a view) or up to DENSE_MAX_BLOCKS blocks (block_diag, a copy), else the
    blocks [kb, n/kb, r/kb]."""
    if blocks.shape[0] == 1:
        return blocks[0]
    if blocks.shape[0] <= DENSE_MAX_BLOCKS:
        return torch.block_diag(*blocks.unbind(0))
    return blocks


def project(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Z = X P: x [..., n] -> [..., r]; p is P as a matrix [n, r] or its diagonal blocks
    [kb, n/kb, r/kb] (see `operand`)."""
    if p.dim() == 2:
        return torch.matmul(x, p)
    kb, b, rb = p.shape
    if kb == 1:
        return torch.matmul(x, p[0])
    lead = x.shape[:-1]
    xb = x.reshape(-1, kb, b).transpose(0, 1)  # [kb, T, b]
    return torch.bmm(xb, p).transpose(0, 1).reshape(*lead, kb * rb)


def unproject(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Y P^T: y [..., r] -> [..., n]; p as in `project`."""
    if p.dim() == 2:
        return torch.matmul(y, p.t())
    kb, b, rb = p.shape
    if kb == 1:
        return torch.matmul(y, p[0].t())
    lead = y.shape[:-1]
    yb = y.reshape(-1, kb, rb).transpose(0, 1)  # [kb, T, r_b]
    return torch.bmm(yb, p.transpose(1, 2)).transpose(0, 1).reshape(*lead, kb * b)
