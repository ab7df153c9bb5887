"""Kept-energy telemetry of a compact-train run (compact_dist.core.kept_energy): the progress
line's fields, the TensorBoard scalars, the warning and the summary, from the fractions that
SubspaceStepper.before_step measured (the same on every rank)."""

from __future__ import annotations

from typing import Optional

import torch

from compact_dist.core.config import ALL_ROLES, CompressionConfig
from compact_dist.core.subspace import compact_layers

SCALAR_PREFIX = "quality/kept_energy"


class KeptEnergyReport:
    """Names the stepper's fractions (compact_layers(model) order) and words them.

    warn_below: the warning threshold on the mean over the layers (logging key
    kept_energy_warn_below). The measurement at step resample_interval never warns: it
    scores the P estimated before training, from the gradients of the initialisation, which
    turn fastest (0.28 at
    110M and 350M in runs that ended at or below the baseline's perplexity,
    benchmarks/results/convergence110m_lr.md, convergence350m.md); it is logged as the others."""

    def __init__(self, model: torch.nn.Module, compression: CompressionConfig,
                 warn_below: float):
        by_module = {id(m): name for name, m in model.named_modules()}
        layers = compact_layers(model)
        self.names = [by_module[id(layer)] for layer in layers]
        self.roles = [layer.role for layer in layers]
        self.compression, self.warn_below = compression, warn_below
        self.step: Optional[int] = None
        self.values: list[float] = []
        self.lowest: Optional[tuple[float, int]] = None  # (mean, step) over the run

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    def worst(self) -> tuple[float, str]:
        return min(zip(self.values, self.names))

    def record(self, step: int, fractions: torch.Tensor) -> dict[str, float]:
        """Keep the measurement of optimizer step `step` ([layers]); returns its scalars:
        quality/kept_energy/<layer name> per layer, .../mean, .../worst and per role
        .../role/<role>."""
        self.step, self.values = step, fractions.tolist()
        if len(self.values) != len(self.names):
            raise ValueError(f"{len(self.values)} kept-energy fractions for "
                             f"{len(self.names)} compact layers")
        if self.lowest is None or self.mean < self.lowest[0]:
            self.lowest = (self.mean, step)
        scalars = {f"{SCALAR_PREFIX}/{n}": v for n, v in zip(self.names, self.values)}
        scalars[f"{SCALAR_PREFIX}/mean"] = self.mean
        scalars[f"{SCALAR_PREFIX}/worst"] = self.worst()[0]
        for role, value in self.role_means().items():
            scalars[f"{SCALAR_PREFIX}/role/{role}"] = value
        return scalars

    def role_means(self) -> dict[str, float]:
        out = {}
        for role in ALL_ROLES:
            values = [v for v, r in zip(self.values, self.roles) if r == role]
            if values:
                out[role] = sum(values) / len(values)
        return out

    def fields(self) -> str:
        """'kept energy 0.912 (qkv 0.950 ...) worst 0.705 <layer>' for the progress line."""
        roles = " ".join(f"{r} {v:.3f}" for r, v in self.role_means().items())
        value, name = self.worst()
        return f"kept energy {self.mean:.3f} ({roles}) worst {value:.3f} {name}"

    def warning(self) -> Optional[str]:
        """The warning line when the mean is below warn_below, with what to do; else None
        (also for the measurement at step resample_interval, which scores the P estimated
        before training: see the class docstring; decided by the step, so a resumed run's first
        measurement warns as any other)."""
        if self.step <= self.compression.resample_interval or self.mean >= self.warn_below:
            return None
        c = self.compression
        size = (f"a larger compression.ratio (now {c.ratio})" if c.rank is None
                else f"a larger compression.rank (now {c.rank})")
        advice = f"a smaller compression.resample_interval (now {c.resample_interval}) or {size}"
        if not c.kind.data_aware:
            advice = (f"a data-aware projection (compression.projection=pca: a Gaussian P keeps "
                      f"about the ratio) or {size}")
        return (f"warning: at step {self.step} the projection keeps {self.mean:.3f} of the "
                f"weight gradients' energy on average (< logging.kept_energy_warn_below="
                f"{self.warn_below}), worst {self.worst()[0]:.3f} in {self.worst()[1]}: "
                f"training loses what P drops; try {advice}")

    def summary(self) -> Optional[str]:
        """The final summary's line; None when nothing was measured."""
        if self.step is None:
            return None
        value, name = self.worst()
        return (f"kept energy at step {self.step}: mean {self.mean:.3f}, worst {value:.3f} "
                f"({name}); lowest mean {self.lowest[0]:.3f} at step {self.lowest[1]}")
