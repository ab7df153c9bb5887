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
k] is kept per layer; the sums C Q0 never form C.

Shapes: x [..., kb * b] (this rank's input columns), g [m, kb * b] (this rank's gradient
shard), blocks [kb, b, r_b] (P's diagonal blocks of this TP rank), sums [kb, b, k].
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from compact_dist.core.projection import block_seed

Kind = Literal["pca", "gradient"]
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
    kind: 'pca' (add_input in forward) or 'gradient' (add_gradient in a probe's backward).
    """

    def __init__(self, previous: torch.Tensor, kind: Kind, seed: int, layer_id: int,
                 epoch: int, first_block: int, orthonormal: Optional[bool] = None):
        kb, b, rb = previous.shape
        extra = oversampling(b, rb)
        omega = torch.empty(kb, b, extra, dtype=torch.float32, device=previous.device)
        gen = torch.Generator(device=previous.device)
        for i in range(kb):
            gen.manual_seed(block_seed(seed, layer_id, _SKETCH_EPOCH_OFFSET + epoch,
                                       first_block + i))
            torch.randn(b, extra, generator=gen, device=previous.device, out=omega[i])
        self.test_basis = _orthonormal_extension(previous.double(), omega.double(),
                                                 orthonormal).float()
        self.sums = torch.zeros_like(self.test_basis)  # C Q0
        self.kind: Kind = kind
        self.rank = rb
        self.open = False  # accumulating (pca: training forwards; gradient: the probe)

    @property
    def num_blocks(self) -> int:
        return self.test_basis.shape[0]

    @torch.no_grad()
    def add_input(self, x: torch.Tensor) -> None:
        """S += X^T (X Q0) per block, X = the tokens of x [..., kb * b] (in x's dtype)."""
        kb, b, _ = self.test_basis.shape
        xb = x.detach().reshape(-1, kb, b).transpose(0, 1)  # [kb, T, b]
        xq = torch.bmm(xb, self.test_basis.to(x.dtype))  # [kb, T, k]
        self.sums += torch.bmm(xb.transpose(1, 2), xq).float()

    @torch.no_grad()
    def add_gradient(self, g: torch.Tensor) -> None:
        """S += G^T (G Q0) per block, G [m, kb * b] (fp32)."""
        kb, b, _ = self.test_basis.shape
        gb = g.detach().float().reshape(g.shape[0], kb, b).transpose(0, 1)  # [kb, m, b]
        self.sums += torch.bmm(gb.transpose(1, 2), torch.bmm(gb, self.test_basis))

    def top(self) -> Optional[torch.Tensor]:
        """Orthonormal top-r_b eigenvector estimates of C per block, [kb, b, r_b] fp32, in
        decreasing order; None when nothing was accumulated (the caller keeps its P)."""
        return top_eigenvectors([self])[0]


@torch.no_grad()
def top_eigenvectors(sketches: list[SubspaceSketch]) -> list[Optional[torch.Tensor]]:
    """`top()` of many sketches; those of one shape are computed as one batch (a few batched
    k x k eigendecompositions instead of a dozen small calls per layer).

    Nystrom in fp64 with a tiny shift nu: Y = S + nu Q0, B = Q0^T Y = L L^T (Cholesky),
    F = Y L^{-T} (C ~ Y B^{-1} Y^T = F F^T); the top eigenvectors of F F^T are
    F W Lambda^{-1/2} with (W, Lambda) the top eigenpairs of the k x k matrix F^T F: no SVD of
    the tall F, one k x k eigendecomposition per layer, and orthonormal to fp64 rounding times
    the kept spectrum's condition number before the cast to fp32. When B is numerically not
    positive definite (a rank-deficient C), F = Y B^{-1/2} from B's clamped eigenpairs instead.
    One host sync per call (which sketches saw data) and one per shape (Cholesky status);
    compact_dist.core.background runs it off the training stream."""
    out: list[Optional[torch.Tensor]] = [None] * len(sketches)
    groups: dict[tuple, list[int]] = {}
    if not sketches:
        return out
    seen = torch.stack([torch.isfinite(sk.sums).all() & (sk.sums.abs().amax() > 0)
                        for sk in sketches]).tolist()
    for i, sk in enumerate(sketches):
        if seen[i]:
            key = (tuple(sk.sums.shape[1:]), sk.rank, sk.sums.device)
            groups.setdefault(key, []).append(i)
    for members in groups.values():
        rank = sketches[members[0]].rank
        s = torch.cat([sketches[i].sums for i in members]).double()
        q0 = torch.cat([sketches[i].test_basis for i in members]).double()
        shift = 1e-10 * torch.linalg.matrix_norm(s, keepdim=True)
        y = s + shift * q0
        b = _symmetric(q0.transpose(1, 2) @ y)
        chol, info = torch.linalg.cholesky_ex(b)
        if bool((info == 0).all()):
            f = torch.linalg.solve_triangular(chol, y.transpose(1, 2), upper=False).transpose(1, 2)
        else:
            evals, evecs = torch.linalg.eigh(b)
            evals = evals.clamp_min(evals.amax(dim=-1, keepdim=True) * 1e-12)
            f = y @ ((evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.transpose(1, 2))
        lam, w = torch.linalg.eigh(_symmetric(f.transpose(1, 2) @ f))  # ascending
        lam = lam[..., -rank:].flip(-1).clamp_min(lam.amax(dim=-1, keepdim=True) * 1e-24)
        u = ((f @ w[..., -rank:].flip(-1)) * lam.rsqrt().unsqueeze(-2)).float()
        for i, part in zip(members, u.split([sketches[i].num_blocks for i in members])):
            out[i] = part.contiguous()
    return out


def _symmetric(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _orthonormal_extension(previous: torch.Tensor, extra: torch.Tensor,
                           orthonormal: Optional[bool] = None) -> torch.Tensor:
    """Q0 [kb, b, r_b + p]: orthonormal, spanning [previous, extra]. An orthonormal previous
    P (data-aware) is kept as the first columns and only the extra columns are
    orthogonalised: Gram-Schmidt against P twice, then Cholesky-QR twice on the b x p block
    (batched GEMMs and p x p Cholesky factors, no host sync: the Gaussian block is
    well-conditioned, b >= p + r_b). A Gaussian one goes through one QR of b x k."""
    if orthonormal is None:
        gram = previous.transpose(1, 2) @ previous
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        orthonormal = torch.allclose(gram, eye.expand_as(gram), atol=1e-6)
    if not orthonormal:
        return torch.linalg.qr(torch.cat([previous, extra], dim=-1))[0]
    if extra.shape[-1] == 0:
        return previous
    for _ in range(2):  # classical Gram-Schmidt, twice is enough
        extra = extra - previous @ (previous.transpose(1, 2) @ extra)
    for _ in range(2):  # Cholesky-QR2: E <- E L^{-T} with L L^T = E^T E
        chol, _ = torch.linalg.cholesky_ex(extra.transpose(1, 2) @ extra)
        extra = torch.linalg.solve_triangular(chol, extra.transpose(1, 2),
                                              upper=False).transpose(1, 2)
    return torch.cat([previous, extra], dim=-1)


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
