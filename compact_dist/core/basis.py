"""Data-aware projections: P from a sketch of what the layer sees, not from a seed alone.

The weight gradient of a linear layer, G = dY^T X (m x n), lives mostly in the dominant
subspace of its input X: a Gaussian P keeps each direction of X at random (r/n of G's energy
in expectation), while the top-r principal directions of X keep nearly all of it. Two
estimators, both a randomized subspace iteration on a PSD matrix C (n x n) that is only ever
touched through the product C Q with a thin test basis Q (n x k, k = r + oversampling):

- `pca`:      C = X^T X, summed over the tokens of the resample step's forward passes;
- `gradient`: C = G^T G (GaLore's choice: P = top-r right singular vectors of G), from one
              extra probe micro-batch whose backward sees the uncompressed input.

Per diagonal block (row-parallel layers keep their block-diagonal P: block j is estimated
from input columns j only, so TP = 1, 2, 4 estimate the same P for a fixed block count):

    Q0 = orth([P_prev, Omega])                 warm start: the previous P + k - r seeded
                                               Gaussian columns (identical on every rank)
    S  = C Q0                                  accumulated in fp32 over micro-batches, then
                                               summed over the data-parallel group (and the
                                               TP group where X or G is sharded over it)
    P  = top-r left singular vectors of the    single-pass Nystrom approximation
         Nystrom factor S (Q0^T S)^{-1/2}      C ~ S (Q0^T S)^{-1} S^T (Tropp et al. 2017)

Repeated every resample, the warm start makes this a subspace iteration over training: each
resample is one more power step on a slowly moving C. No tensor bigger than [blocks, n/blocks,
k] is kept per layer; the sums C Q0 never form C. A warm-started Q0's first r_b columns are
the previous P itself: the sketch references the layer's fp32 P and stores only the other
columns (SubspaceSketch.kept / new_columns).

Shapes: x [..., kb * b] (this rank's input columns), g [m, kb * b] (this rank's gradient
shard), blocks [kb, b, r_b] (P's diagonal blocks of this TP rank), sums [kb, b, k].
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Union

import torch

from compact_dist.core.projection import block_seed
from compact_dist.core.projection_kinds import ProjectionKind, projection_kind

# seeds of the sketch's random columns: an epoch range the projections never use
_SKETCH_EPOCH_OFFSET = 1 << 40


def oversampling(block_in: int, block_rank: int) -> int:
    """Extra test columns per block beyond r_b (within the block's n_b columns)."""
    return min(block_in - block_rank, max(8, block_rank // 4))


class SubspaceSketch:
    """Accumulates S = C Q0 for one layer's blocks; `top(r)` returns the new orthonormal P.

    previous: the current P blocks [kb, b, r_b] (any scale; only their span is used).
    orthonormal: whether `previous` has orthonormal columns (a data-aware P); None = test it
        (one host sync).
    seed, layer_id, epoch, first_block: identify the seeded extra columns (global block
        index, so every rank that owns a block draws the same columns for it).
    kind: a data-aware ProjectionKind or its name (compact_dist.core.projection_kinds):
        fed in forward (add_input, kind.sketch_in_forward: 'pca') or in a probe's backward
        (add_gradient: 'gradient'), which `fed_in_backward` tells the layers.

    Q0 = [kept | new_columns] (fp32; `test_columns` puts blocks of it together): an
    orthonormal fp32 `previous` (every data-aware P after the first estimate) is Q0's first
    r_b columns as it is, so `kept` is that tensor itself, not a copy (the layer's basis,
    whose memory the layer holds anyway), and `new_columns` holds only the p extra columns
    [kb, b, p]. The owner must not change `previous` in place while the sketch lives (a
    layer replaces its basis at a resample, never writes into it): every use checks the
    tensor's version counter and raises if it moved. A Gaussian `previous` (the first
    estimate) is no part of Q0: then `kept` is None and `new_columns` is all of Q0 [kb, b, k].
    """

    def __init__(self, previous: torch.Tensor, kind: Union[str, ProjectionKind], seed: int,
                 layer_id: int,
                 epoch: int, first_block: int, orthonormal: Optional[bool] = None):
        kb, b, rb = previous.shape
        extra = oversampling(b, rb)
        omega = torch.empty(kb, b, extra, dtype=torch.float32, device=previous.device)
        gen = torch.Generator(device=previous.device)
        for i in range(kb):
            gen.manual_seed(block_seed(seed, layer_id, _SKETCH_EPOCH_OFFSET + epoch,
                                       first_block + i))
            torch.randn(b, extra, generator=gen, device=previous.device, out=omega[i])
        if orthonormal is None:
            orthonormal = _is_orthonormal(previous.double())
        if orthonormal:  # Q0 = [previous, E]: keep a reference to previous, store E
            if previous.dtype != torch.float32:
                raise ValueError(
                    f"an orthonormal previous P must be the layer's fp32 basis (the sketch "
                    f"references it as Q0's first columns), got {previous.dtype}")
            self.kept: Optional[torch.Tensor] = previous
            self.new_columns = _orthonormal_complement(previous.double(),
                                                       omega.double()).float()
        else:
            self.kept = None
            self.new_columns = torch.linalg.qr(
                torch.cat([previous.double(), omega.double()], dim=-1))[0].float()
        self._kept_version = None if self.kept is None else self.kept._version
        self.sums = torch.zeros((kb, b, rb + extra), dtype=torch.float32,
                                device=previous.device)  # C Q0
        self.kind = projection_kind(kind)
        if not self.kind.data_aware:
            raise ValueError(f"a {self.kind} projection is not estimated from a sketch")
        self.fed_in_backward = not self.kind.sketch_in_forward
        self.rank = rb
        self.num_blocks = kb
        self.open = False  # accumulating (pca: training forwards; gradient: the probe)
        self.released = False

    def release(self) -> None:
        """Drop S and Q0's columns (and the reference to P): the estimate is done with them
        (`bases_from_factors`); any later use raises."""
        self.sums = self.new_columns = self.kept = None
        self.released = True

    def _check(self) -> None:
        if self.released:
            raise RuntimeError("this sketch was consumed by an estimate (top_eigenvectors): "
                               "its S and Q0 are freed")
        if self.kept is not None and self.kept._version != self._kept_version:
            raise RuntimeError("the P a sketch was started from changed in place while the "
                               "sketch was open: its test basis Q0 = [P | E] is no longer "
                               "the one S = C Q0 was accumulated with")

    def test_columns(self, part: slice = slice(None),
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Q0 of blocks `part` in `dtype`: [len, b, k]; [kept | new_columns] put together (a
        copy of these blocks) or, without `kept`, `new_columns` (a view in fp32)."""
        self._check()
        if self.kept is None:
            return self.new_columns[part].to(dtype)
        return torch.cat([self.kept[part].to(dtype), self.new_columns[part].to(dtype)],
                         dim=-1)

    def copy_test_columns(self, part: slice, out: torch.Tensor) -> None:
        """Write Q0 of blocks `part` into `out` [len, b, k] (any dtype; no fp32 copy of the
        blocks on the way)."""
        self._check()
        if self.kept is None:
            out.copy_(self.new_columns[part])
            return
        out[..., :self.rank].copy_(self.kept[part])
        out[..., self.rank:].copy_(self.new_columns[part])

    @property
    def test_basis(self) -> torch.Tensor:
        """All of Q0 [kb, b, k] fp32 (a copy where `kept` is shared: for inspection; the
        estimate itself takes blocks of it through `test_columns`)."""
        return self.test_columns()

    def stored_bytes(self) -> int:
        """Bytes this sketch holds itself: S and Q0's columns it owns (not `kept`, the
        caller's P); 0 once released."""
        if self.released:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.sums, self.new_columns))

    @torch.no_grad()
    def add_input(self, x: torch.Tensor) -> None:
        """S += X^T (X Q0) per block, X = the tokens of x [..., kb * b] (in x's dtype). X Q0
        is one product with all k columns (X P alone, as forward computes it, rounds
        differently: GEMM kernels differ by shape)."""
        self._check()
        kb, b = self.sums.shape[:2]
        xb = x.detach().reshape(-1, kb, b).transpose(0, 1)  # [kb, T, b]
        xq = torch.bmm(xb, self.test_columns(dtype=x.dtype))  # [kb, T, k]
        self.sums += torch.bmm(xb.transpose(1, 2), xq).float()

    @torch.no_grad()
    def add_gradient(self, g: torch.Tensor) -> None:
        """S += G^T (G Q0) per block, G [m, kb * b] (fp32)."""
        self._check()
        kb, b = self.sums.shape[:2]
        gb = g.detach().float().reshape(g.shape[0], kb, b).transpose(0, 1)  # [kb, m, b]
        self.sums += torch.bmm(gb.transpose(1, 2), torch.bmm(gb, self.test_columns()))

    def top(self) -> Optional[torch.Tensor]:
        """Orthonormal top-r_b eigenvector estimates of C per block, [kb, b, r_b] fp32, in
        decreasing order; None when nothing was accumulated (the caller keeps its P). The
        sketch stays usable (the estimate consumes a shallow copy of it)."""
        self._check()
        return top_eigenvectors([copy.copy(self)])[0]


# fp64 elements per chunk of a tall [blocks, b, k] tensor (16 MiB): bounds the transient
# memory of a group of many layers of one shape (at least one block per chunk)
CHUNK_ELEMENTS = 2 * 2**20


@dataclass
class NystromGroup:
    """The sketches of one shape, reduced to what the solve needs (see `nystrom_factors`).

    members: indices into the sketch list; sketches: those sketches (in that order; their
    blocks laid end to end make the group's B blocks); shape: (b, k); rank: r_b.
    shift [B, 1, 1] = nu per block (fp64, on the sketches' device: Y = S + nu Q0 is formed
    again one chunk at a time where it is needed, never kept whole);
    gram_b [B, k, k] = Q0^T Y and gram_y [B, k, k] = Y^T Y (fp64, in host memory, pinned
    with CUDA); transform [B, k, r_b] (fp64, host) once solved."""

    members: list[int]
    sketches: list[SubspaceSketch]
    shape: tuple[int, int]
    rank: int
    shift: torch.Tensor
    gram_b: torch.Tensor
    gram_y: torch.Tensor
    transform: Optional[torch.Tensor] = None

    @property
    def blocks(self) -> list[int]:
        """Each member's block count."""
        return [sk.num_blocks for sk in self.sketches]


def _chunks(total: int, per_item: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return [slice(i, min(total, i + step)) for i in range(0, total, step)]


@torch.no_grad()
def nystrom_factors(sketches: list[SubspaceSketch]) -> list[NystromGroup]:
    """Step 1 of `top_eigenvectors` (on the sketches' stream, chunked): which sketches saw
    data (one host sync), then per shape nu, Q0^T Y and Y^T Y in fp64 (Y = S + nu Q0, the
    only tall operand; the rest is k x k), the latter two copied to host memory
    (asynchronously with CUDA: wait for the stream before reading them). Sketches that saw
    nothing are in no group. Per chunk of blocks [c, b, k] it holds S (then Y, in place) and
    Q0 in fp64 (`_blocks_of`) and the k x k products: no tall tensor outlives its chunk."""
    groups: dict[tuple, list[int]] = {}
    if not sketches:
        return []
    for sk in sketches:
        sk._check()
    seen = torch.stack([torch.isfinite(sk.sums).all() & (sk.sums.abs().amax() > 0)
                        for sk in sketches]).tolist()
    for i, sk in enumerate(sketches):
        if seen[i]:
            key = (tuple(sk.sums.shape[1:]), sk.rank, sk.sums.device)
            groups.setdefault(key, []).append(i)
    out = []
    for (shape, rank, device), members in groups.items():
        group_sketches = [sketches[i] for i in members]
        n, (b, k) = sum(sk.num_blocks for sk in group_sketches), shape
        cuda = device.type == "cuda"
        group = NystromGroup(
            members, group_sketches, (b, k), rank,
            torch.empty((n, 1, 1), dtype=torch.float64, device=device),
            torch.empty((n, k, k), dtype=torch.float64, pin_memory=cuda),
            torch.empty((n, k, k), dtype=torch.float64, pin_memory=cuda))
        for part in _chunks(n, b * k):
            y = _blocks_of(group_sketches, part, "sums")
            shift = group.shift[part]
            torch.mul(torch.linalg.matrix_norm(y, keepdim=True), 1e-10, out=shift)
            q0 = _blocks_of(group_sketches, part, "test_columns")
            y.add_(q0.mul_(shift))  # Y = S + nu Q0
            del q0
            q0 = _blocks_of(group_sketches, part, "test_columns")
            group.gram_b[part].copy_(_symmetric(q0.transpose(1, 2) @ y), non_blocking=cuda)
            del q0
            group.gram_y[part].copy_(_symmetric(y.transpose(1, 2) @ y), non_blocking=cuda)
        out.append(group)
    return out


def _blocks_of(sketches: list[SubspaceSketch], part: slice, what: str) -> torch.Tensor:
    """S (what='sums') or Q0 (what='test_columns') of the blocks `part` of the sketches'
    blocks laid end to end, fp64 [len, b, k]: only these blocks are put together (no copy of
    a whole group's Q0 or S), written straight into one fp64 tensor (the fp32 -> fp64 copy is
    exact)."""
    pieces, start = [], 0
    for sk in sketches:
        stop = start + sk.num_blocks
        lo, hi = max(part.start, start), min(part.stop, stop)
        if lo < hi:
            pieces.append((sk, slice(lo - start, hi - start)))
        start = stop
    first = pieces[0][0].sums
    out = torch.empty((part.stop - part.start,) + tuple(first.shape[1:]), dtype=torch.float64,
                      device=first.device)
    row = 0
    for sk, own in pieces:
        rows = out[row:row + own.stop - own.start]
        if what == "sums":
            rows.copy_(sk.sums[own])
        else:
            sk.copy_test_columns(own, rows)
        row += own.stop - own.start
    return out


def solver_threads() -> int:
    """CPU threads for the k x k solves: this process's share of the cores it may run on
    (its affinity mask divided by the ranks on the node, LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _solve_chunk(gram_b: torch.Tensor, gram_y: torch.Tensor, rank: int) -> torch.Tensor:
    """T [B, k, rank] from B = Q0^T Y and Y^T Y [B, k, k] (see solve_factors)."""
    k = gram_b.shape[-1]
    chol, info = torch.linalg.cholesky_ex(gram_b)
    if bool((info == 0).all()):
        eye = torch.eye(k, dtype=gram_b.dtype, device=gram_b.device).expand_as(gram_b)
        inv_t = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(1, 2)
    else:
        evals, evecs = torch.linalg.eigh(gram_b)
        evals = evals.clamp_min(evals.amax(dim=-1, keepdim=True) * 1e-12)
        inv_t = (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.transpose(1, 2)
    m = _symmetric(inv_t.transpose(1, 2) @ gram_y @ inv_t)
    lam, w = torch.linalg.eigh(m)  # ascending
    lam = lam[..., -rank:].flip(-1)
    lam = lam.clamp_min(lam.amax(dim=-1, keepdim=True) * 1e-24)
    return inv_t @ (w[..., -rank:].flip(-1) * lam.rsqrt().unsqueeze(-2))


@torch.no_grad()
def solve_factors(groups: list[NystromGroup], threads: Optional[int] = None) -> None:
    """Step 2 (k x k only, on host cores): per block the transform T with P = Y T.
    B = Q0^T Y = L L^T, F = Y L^{-T} (C ~ Y B^{-1} Y^T = F F^T), F^T F = L^{-1} (Y^T Y)
    L^{-T} = W Lambda W^T, P = F W_r Lambda_r^{-1/2}, so T = L^{-T} W_r Lambda_r^{-1/2}.
    Where B is numerically not positive definite (a rank-deficient C), B^{-1/2} from B's
    clamped eigenpairs replaces L^{-T}.
    Why the host: the cost is latency, not FLOPs. On CUDA torch loops cusolver's syevd over
    every matrix of a batch (k > 32): 0.87 s for the 432 eigendecompositions of a 1.3B
    estimate on an H200, where `threads` Python threads (default `solver_threads()`) each
    running single-threaded LAPACK calls take 0.39 s on its 16 host cores
    (benchmarks/eigh_cost.py). torch's intra-op threads are set to 1 meanwhile (a
    process-wide setting, restored after)."""
    tasks = []
    for group in groups:
        n = group.gram_b.shape[0]
        group.transform = torch.empty((n, group.gram_b.shape[-1], group.rank),
                                      dtype=torch.float64)
        per_task = max(1, 2**16 // group.gram_b.shape[-1] ** 2)  # one matrix when k >= 256
        tasks += [(group, slice(i, min(n, i + per_task))) for i in range(0, n, per_task)]

    def run(task) -> None:
        group, part = task
        group.transform[part] = _solve_chunk(group.gram_b[part], group.gram_y[part],
                                             group.rank)

    threads = threads or solver_threads()
    if threads == 1 or len(tasks) <= 1:
        for task in tasks:
            run(task)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(tasks)),
                                thread_name_prefix="compact-solve") as pool:
            list(pool.map(run, tasks))
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def bases_from_factors(groups: list[NystromGroup], count: int,
                       device: torch.device) -> list[Optional[torch.Tensor]]:
    """Step 3 (on `device`'s current stream): P = Y T per block, fp32 [kb, b, r_b] per sketch,
    each its own tensor (None for the `count` - grouped ones that saw nothing). Y = S + nu Q0
    is formed again per chunk of blocks from the sketches ([c, b, k] fp64, the same bits as
    in step 1). Consumes the grouped sketches: a sketch's S and Q0 columns are freed
    (`SubspaceSketch.release`) once its last block is done, so the new bases replace the
    sketches layer by layer. Y T is orthonormal up to rounding amplified by the kept
    spectrum's condition number (1e-2 for a rank-deficient C), so it is re-orthonormalised
    (Cholesky-QR twice: column j keeps the span of columns 1..j)."""
    out: list[Optional[torch.Tensor]] = [None] * count
    for group in groups:
        (b, _), n = group.shape, group.shift.shape[0]
        ends, start = [], 0
        for i, sk in zip(group.members, group.sketches):
            ends.append((start, start + sk.num_blocks, i, sk))
            start += sk.num_blocks
        for part in _chunks(n, b * group.rank):
            y = _blocks_of(group.sketches, part, "test_columns")
            y.mul_(group.shift[part])
            mine = [(i, sk, slice(max(part.start, lo) - lo, min(part.stop, hi) - lo),
                     max(part.start, lo) - part.start)
                    for lo, hi, i, sk in ends if max(part.start, lo) < min(part.stop, hi)]
            for _, sk, own, row in mine:  # Y = S + nu Q0 (the fp32 S is read as fp64)
                y[row:row + own.stop - own.start].add_(sk.sums[own])
            p = y @ group.transform[part].to(device)
            del y
            p = _orthonormalised(p)
            for i, sk, own, row in mine:  # each layer's new basis, its own tensor
                if out[i] is None:
                    out[i] = torch.empty((sk.num_blocks, b, group.rank), dtype=torch.float32,
                                         device=device)
                out[i][own] = p[row:row + own.stop - own.start]
                if own.stop == sk.num_blocks:  # its last block is done
                    sk.release()
            del p
    return out


@torch.no_grad()
def top_eigenvectors(sketches: list[SubspaceSketch]) -> list[Optional[torch.Tensor]]:
    """`top()` of many sketches; those of one shape are computed as one batch. Nystrom in
    fp64 with a tiny shift nu (Y = S + nu Q0): `nystrom_factors`, `solve_factors`,
    `bases_from_factors` (no SVD of a tall matrix, one k x k eigendecomposition per block;
    orthonormal to fp64 rounding times the kept spectrum's condition number before the cast
    to fp32); the k x k solves run on the host's cores (`solve_factors`). Consumes the
    sketches that saw data (their S and Q0 are freed as their new bases are made,
    `bases_from_factors`); `SubspaceSketch.top` keeps its sketch."""
    if not sketches:
        return []
    device = sketches[0].sums.device
    groups = nystrom_factors(sketches)
    if device.type == "cuda":  # the Gram matrices' copies to host memory are done
        torch.cuda.current_stream(device).synchronize()
    solve_factors(groups)
    return bases_from_factors(groups, len(sketches), device)


def _orthonormalised(p: torch.Tensor) -> torch.Tensor:
    """[B, b, r] fp64 -> the same column spans (1..j for every j), orthonormal: Cholesky-QR
    twice, or Householder QR where the Gram matrix is numerically singular (one host sync)."""
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(p.transpose(1, 2) @ p)
        if not bool((info == 0).all()):
            q, r = torch.linalg.qr(p)
            return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        p = torch.linalg.solve_triangular(chol, p.transpose(1, 2), upper=False).transpose(1, 2)
    return p


def _symmetric(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _is_orthonormal(p: torch.Tensor) -> bool:
    """Whether every block of p [kb, b, r] has orthonormal columns (to 1e-6; one host sync)."""
    gram = p.transpose(1, 2) @ p
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.allclose(gram, eye.expand_as(gram), atol=1e-6)


def _orthonormal_complement(previous: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """E [kb, b, p]: orthonormal, orthogonal to the orthonormal `previous` [kb, b, r_b], with
    [previous, E] spanning [previous, extra]: Gram-Schmidt against previous twice, then
    Cholesky-QR twice on the b x p block (batched GEMMs and p x p Cholesky factors, no host
    sync: the Gaussian block is well-conditioned, b >= p + r_b)."""
    for _ in range(2):  # classical Gram-Schmidt, twice is enough
        extra = extra - previous @ (previous.transpose(1, 2) @ extra)
    if extra.shape[-1] == 0:
        return extra
    for _ in range(2):  # Cholesky-QR2: E <- E L^{-T} with L L^T = E^T E
        chol, _ = torch.linalg.cholesky_ex(extra.transpose(1, 2) @ extra)
        extra = torch.linalg.solve_triangular(chol, extra.transpose(1, 2),
                                              upper=False).transpose(1, 2)
    return extra


def transport_map(old: torch.Tensor, new: torch.Tensor,
                  orthonormal_old: bool = False) -> torch.Tensor:
    """R [kb, r_b, r_b] with G P_new ~ (G P_old) R for G in the span of P_old, per block:
    R = (P_old^T P_old)^{-1} P_old^T P_new, or P_old^T P_new when P_old is orthonormal
    (orthonormal_old: no solve, no host sync)."""
    old, new = old.double(), new.double()
    cross = old.transpose(1, 2) @ new
    if orthonormal_old:
        return cross.float()
    return torch.linalg.solve(old.transpose(1, 2) @ old, cross).float()


def kept_fraction(old: torch.Tensor, new: torch.Tensor, transport: torch.Tensor) -> torch.Tensor:
    """[kb, r_b]: per block, the fraction of each new direction's squared norm that lies in
    the old span, ||P_old R[:, k]||^2 / ||P_new[:, k]||^2 in [0, 1] (R = transport_map(old,
    new); for orthonormal P_old and P_new this is ||R[:, k]||^2). 1 for a direction the old
    basis spans, 0 for one orthogonal to it. old, new: [kb, n_b, r_b]."""
    seen = (old.double() @ transport.double()).pow(2).sum(1)
    return (seen / new.double().pow(2).sum(1).clamp_min(1e-300)).clamp(0.0, 1.0).float()

