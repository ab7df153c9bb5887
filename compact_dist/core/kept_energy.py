"""Quality telemetry: the fraction of the weight gradient's energy that the projection P keeps.

A compact layer trains only along span(P): its update is built from G P (subspace mode) or
G P P^T (unbiased mode), G = dY^T X [m, n] the full-rank weight gradient the layer would have
had. What P keeps of G is the energy of G's orthogonal projection onto span(P):

    kept = ||G Q||^2 / ||G||^2,   Q = an orthonormal basis of span(P) (per diagonal block)

i.e. ||G P (P^T P)^{-1} P^T||^2 / ||G||^2. For an orthonormal P (the data-aware 'pca' /
'gradient' P, orthonormal per block) Q = P and this is ||G P||^2 / ||G||^2; for the seeded
Gaussian P it is the projection formula (Q from a QR of each block in fp64): r / n in
expectation for a G with no preferred direction. 1 means training loses nothing to the
compression on this micro-batch's gradient.

G needs the exact input X, which a compact layer does not keep (it saves X P): it comes from
a probe micro-batch whose backward sees the uncompressed input, the one projection='gradient'
uses (compact_dist.core.autograd: a probe consumer `fed_in_backward` receives G of this TP
shard in fp32). A `KeptEnergy` is such a consumer; `GradientConsumers` feeds the same G to
several (the 'gradient' sketch and a KeptEnergy when one probe serves both).

Sums (`fractions`): each TP rank holds a distinct shard of G (column-parallel: rows of G;
row-parallel: columns of G and P's diagonal blocks over them), so both energies are summed
over the tensor-parallel group; each data-parallel rank probes its own micro-batch, so they
are summed over the data-parallel group too. The fraction is therefore
sum_d ||G_d Q||^2 / sum_d ||G_d||^2 over the data-parallel ranks' micro-batch gradients G_d
(the kept fraction of their stacked gradients, not of their sum), the same on every rank.

Memory: two fp32 numbers per layer, plus transients while one layer's probe backward runs
(G [m, n] fp32 and G Q [m, r]: the 'gradient' sketch forms the same G; Gaussian P: its fp32
blocks and their Q).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist


class KeptEnergy:
    """Per layer: accumulates [||G||^2, ||G Q||^2] (fp32) over the probe backwards it sees.

    blocks: returns this rank's P blocks [kb, n_b, r_b] (fp32), called once at the first
        gradient (not held across the probe: a Gaussian P is regenerated from its seeds).
    orthonormal: P's blocks are orthonormal (data-aware): Q = P without a QR.
    """

    fed_in_backward = True  # fed in a probe's backward, like a 'gradient' sketch

    def __init__(self, blocks: Callable[[], torch.Tensor], orthonormal: bool):
        self._blocks = blocks
        self.orthonormal = orthonormal
        self.sums: Optional[torch.Tensor] = None  # [2]: ||G||^2, ||G Q||^2
        self.open = False

    @torch.no_grad()
    def add_gradient(self, g: torch.Tensor) -> None:
        """g: this TP shard's G [m, kb * n_b] (fp32), P's blocks over its columns."""
        q = self._blocks().float()
        if not self.orthonormal:
            q = torch.linalg.qr(q.double())[0].float()
        kb, b, _ = q.shape
        gb = g.detach().float().reshape(g.shape[0], kb, b).transpose(0, 1)  # [kb, m, n_b]
        energies = torch.stack([gb.pow(2).sum(), torch.bmm(gb, q).pow(2).sum()])
        self.sums = energies if self.sums is None else self.sums + energies


class GradientConsumers:
    """Several probe consumers fed the same G (one probe for the sketch and the telemetry)."""

    fed_in_backward = True

    def __init__(self, consumers: list):
        self.consumers = consumers

    def add_gradient(self, g: torch.Tensor) -> None:
        for consumer in self.consumers:
            consumer.add_gradient(g)


def fractions(accumulators: list[KeptEnergy], dp_group: Optional[dist.ProcessGroup] = None,
              tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """[layers] fp32 (on the accumulators' device): kept energy per layer, both energies
    summed over `dp_group` and then `tp_group` (one all_reduce each for all layers; None or
    a group of one: no communication). Every rank of both groups calls with the same layers.
    Raises when a layer saw no gradient (the probe did not reach it). A layer whose summed
    gradient energy is zero or not finite (a diverging run) gets NaN, shown as such: the
    training loop's non-finite check, not this measurement, stops such a run."""
    if any(acc.sums is None for acc in accumulators):
        raise RuntimeError("kept energy: a compact layer saw no probe gradient (the probe "
                           "loss must depend on every compact layer)")
    sums = torch.stack([acc.sums for acc in accumulators])  # [layers, 2]
    for group in (dp_group, tp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
    defined = torch.isfinite(sums).all(dim=1) & (sums[:, 0] > 0)
    return torch.where(defined, sums[:, 1] / sums[:, 0].clamp_min(torch.finfo(sums.dtype).tiny),
                       torch.full_like(sums[:, 0], float("nan")))
