"""The kinds of projection P, one class each behind one protocol, chosen in one place.

- gaussian: a seeded Gaussian P (the paper's; compact_dist.core.projection), redrawn every
  `resample_interval` steps; E[P P^T] = I, so the only kind 'unbiased' mode can use.
- pca: the top-r principal directions of the layer's input X, sketched in the training
  forwards of the resample step (compact_dist.core.basis).
- gradient: the top-r right singular vectors of the weight gradient G, sketched from one
  probe micro-batch with uncompressed inputs at each resample (GaLore's choice).
A data-aware P is first estimated in step 1 (0-based step 0, from the initial Gaussian P)
and then in the last step of every `resample_interval` steps, warm-started from the current P.

`projection_kind(name)` is the one place a name (CompressionConfig.projection) becomes a
kind; everything else asks the kind. Adding a projection: a class here, its name in
PROJECTION_KINDS, and what it sketches in compact_dist.core.basis (docs/EXTENDING.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union


@dataclass(frozen=True)
class ProjectionKind:
    """What the training loop and the layers need to know of a kind of P.

    data_aware: P is estimated from data at resamples (else seeded).
    sketch_in_forward: the estimate is fed by the step's training forwards (the layer's
        input X); else by a probe's backward (the uncompressed gradient G).
    needs_probe: the estimating step needs SubspaceStepper.before_step(probe_loss).
    default_moments: moments_on_resample unless set (consecutive independent draws leave
        nothing to transport).
    unbiased: E[P P^T] = I, which 'unbiased' mode needs.
    """

    name: ClassVar[str]
    data_aware: ClassVar[bool]
    sketch_in_forward: ClassVar[bool] = False
    needs_probe: ClassVar[bool] = False
    default_moments: ClassVar[Literal["keep", "reset", "transport"]] = "transport"
    unbiased: ClassVar[bool] = False

    def estimates_at(self, step: int, resample_interval: int) -> bool:
        """Does (0-based) optimizer step `step` sketch the next P?"""
        return self.data_aware and (step == 0 or (step + 1) % resample_interval == 0)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class GaussianProjection(ProjectionKind):
    name: ClassVar[str] = "gaussian"
    data_aware: ClassVar[bool] = False
    default_moments: ClassVar[Literal["keep", "reset", "transport"]] = "keep"
    unbiased: ClassVar[bool] = True


@dataclass(frozen=True)
class PcaProjection(ProjectionKind):
    name: ClassVar[str] = "pca"
    data_aware: ClassVar[bool] = True
    sketch_in_forward: ClassVar[bool] = True


@dataclass(frozen=True)
class GradientProjection(ProjectionKind):
    name: ClassVar[str] = "gradient"
    data_aware: ClassVar[bool] = True
    needs_probe: ClassVar[bool] = True


PROJECTION_KINDS: dict[str, ProjectionKind] = {
    kind.name: kind for kind in (GaussianProjection(), PcaProjection(), GradientProjection())}
# what CompressionConfig.projection accepts: the names above
ProjectionName = Literal[tuple(PROJECTION_KINDS)]  # type: ignore[valid-type]
# the kind 'unbiased' mode takes unless the projection is set
UNBIASED_DEFAULT = GaussianProjection.name


def projection_kind(kind: Union[str, ProjectionKind]) -> ProjectionKind:
    """The kind of P named `kind` (a kind passes through)."""
    if isinstance(kind, ProjectionKind):
        return kind
    try:
        return PROJECTION_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown projection {kind!r}: one of "
                         f"{', '.join(PROJECTION_KINDS)}") from None
