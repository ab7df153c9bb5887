"""The kinds of P (compact_dist.core.projection_kinds): one registry that the config, the
stepper's schedule and the sketches read; no name is compared anywhere else."""

import re
import typing
from pathlib import Path

import pytest
import torch

import compact_dist
from compact_dist.core.basis import SubspaceSketch
from compact_dist.core.config import CompressionConfig
from compact_dist.core.projection_kinds import PROJECTION_KINDS, projection_kind


def test_the_config_accepts_exactly_the_registered_kinds():
    field = CompressionConfig.model_fields["projection"].annotation
    assert set(typing.get_args(field)) == set(PROJECTION_KINDS) == {"gaussian", "pca",
                                                                      "gradient"}
    for name, kind in PROJECTION_KINDS.items():
        config = CompressionConfig(projection=name)
        assert config.kind is kind and config.moments_on_resample == kind.default_moments
    with pytest.raises(ValueError, match="unknown projection 'svd'"):
        projection_kind("svd")


def test_schedule_and_what_feeds_the_sketch():
    gaussian, pca, gradient = (PROJECTION_KINDS[n] for n in ("gaussian", "pca", "gradient"))
    estimating = [s for s in range(12) if pca.estimates_at(s, 5)]
    assert estimating == [0, 4, 9] == [s for s in range(12) if gradient.estimates_at(s, 5)]
    assert not any(gaussian.estimates_at(s, 5) for s in range(12))
    previous = torch.randn(1, 8, 2)
    assert not SubspaceSketch(previous, "pca", 1, 0, 0, 0).fed_in_backward
    assert SubspaceSketch(previous, gradient, 1, 0, 0, 0).fed_in_backward
    with pytest.raises(ValueError, match="not estimated from a sketch"):
        SubspaceSketch(previous, "gaussian", 1, 0, 0, 0)


def test_no_module_compares_projection_names():
    """Outside the registry, code asks a kind's attributes, never compares its name."""
    root = Path(compact_dist.__file__).parent
    compare = re.compile(r"""(==|!=|\bin)\s*\(?["'](gaussian|pca|gradient)["']""")
    hits = [f"{path.name}:{i}" for path in root.rglob("*.py")
            if path.name != "projection_kinds.py"
            for i, line in enumerate(path.read_text().splitlines(), 1) if compare.search(line)]
    assert not hits, hits
