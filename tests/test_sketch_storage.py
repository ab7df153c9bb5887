"""A warm-started sketch shares the layer's fp32 P as Q0's first columns (issue 28): same
bits as storing all of Q0, P's bytes fewer, and an error if P is written in place."""

import pytest
import torch

import compact_dist.core.basis as basis
from compact_dist.core.basis import SubspaceSketch, top_eigenvectors
from compact_dist.core.config import CompressionConfig, LayerCompression
from compact_dist.core.subspace import SubspaceStepper
from layer_utils import build

# shapes of one Nystrom group spread over two sketches, plus a group of one
SHAPES = [(4, 16, 4), (3, 16, 4), (2, 32, 8)]


def _bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _full_q0_copy(sketch: SubspaceSketch) -> SubspaceSketch:
    """The same sketch storing all of Q0 itself (the layout before issue 28)."""
    full = SubspaceSketch.__new__(SubspaceSketch)
    full.__dict__.update(sketch.__dict__)
    full.kept, full._kept_version = None, None
    full.new_columns = torch.cat([sketch.kept, sketch.new_columns], dim=-1).clone()
    full.sums = sketch.sums.clone()
    return full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_p_gives_the_bits_of_a_stored_q0_and_saves_p(monkeypatch, dtype):
    """Orthonormal previous P: S and the new P are bit-identical to the full-Q0 layout (fp32
    and bf16 inputs; chunks of the Nystrom step straddle two sketches), and the sketch owns
    S and E only: P's bytes fewer than S + Q0."""
    monkeypatch.setattr(basis, "CHUNK_ELEMENTS", 5 * 16 * 12)  # 5 of the 7 blocks of 16 x 12
    gen = torch.Generator().manual_seed(0)
    shared, full = [], []
    for i, shape in enumerate(SHAPES):
        prev = torch.linalg.qr(torch.randn(*shape, generator=gen, dtype=torch.float64))[0]
        prev = prev.float()
        sketch = SubspaceSketch(prev, "pca", seed=1, layer_id=i, epoch=2, first_block=0,
                                orthonormal=True)
        assert sketch.kept is prev  # a reference, not a copy
        reference = _full_q0_copy(sketch)
        for _ in range(2):
            x = torch.randn(40, shape[0] * shape[1], generator=gen).to(dtype)
            sketch.add_input(x)
            reference.add_input(x)
        assert torch.equal(sketch.sums, reference.sums)
        assert (_bytes(sketch.sums) + _bytes(sketch.new_columns)
                == _bytes(reference.sums) + _bytes(reference.new_columns) - _bytes(prev))
        assert sketch.stored_bytes() == reference.stored_bytes() - _bytes(prev)
        shared.append(sketch)
        full.append(reference)
    for ours, theirs in zip(top_eigenvectors(shared), top_eigenvectors(full)):
        assert torch.equal(ours, theirs)


def test_gaussian_previous_p_keeps_the_whole_q0():
    """First estimate (Gaussian P, not orthonormal): Q0 = orth([P, Omega]) is stored whole
    and P is not referenced."""
    prev = torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(1))
    sketch = SubspaceSketch(prev, "pca", seed=1, layer_id=0, epoch=0, first_block=0)
    assert sketch.kept is None
    q0 = sketch.new_columns
    assert q0.shape == (2, 32, 8 + basis.oversampling(32, 8))
    torch.testing.assert_close(q0.transpose(1, 2) @ q0, torch.eye(q0.shape[-1]).expand(
        2, -1, -1), atol=1e-6, rtol=0)
    # Q0 spans P: its projector keeps P
    torch.testing.assert_close(q0 @ (q0.transpose(1, 2) @ prev), prev, atol=1e-5, rtol=0)
    assert sketch.stored_bytes() == _bytes(sketch.sums) + _bytes(q0) == 2 * 4 * q0.numel()


def test_p_written_in_place_while_the_sketch_is_open_raises():
    prev = torch.linalg.qr(torch.randn(1, 32, 8, dtype=torch.float64))[0].float()
    sketch = SubspaceSketch(prev, "pca", seed=1, layer_id=0, epoch=0, first_block=0)
    sketch.add_input(torch.randn(10, 32))
    prev.mul_(1.0)
    with pytest.raises(RuntimeError, match="changed in place"):
        sketch.add_input(torch.randn(10, 32))
    with pytest.raises(RuntimeError, match="changed in place"):
        sketch.top()


@pytest.mark.usefixtures("megatron_tp1")
def test_layer_sketch_references_its_basis_after_the_first_estimate():
    """A pca layer's second sketch holds the layer's basis tensor itself (same storage), the
    first (from the Gaussian P) none."""
    layer = build("row", 64, 48, LayerCompression(ratio=0.25, row_parallel_blocks=2))
    model = torch.nn.ModuleList([layer])
    stepper = SubspaceStepper(model, CompressionConfig(
        projection="pca", ratio=0.25, row_parallel_blocks=2, resample_interval=1,
        moments_on_resample="keep"))
    assert layer.sketch.kept is None
    x = torch.randn(16, 2, 64)
    layer(x)
    stepper.after_step(0.0, 0.0)
    assert layer.basis is not None
    assert layer.sketch.kept.untyped_storage().data_ptr() == (
        layer.basis.untyped_storage().data_ptr())
    assert layer.sketch.kept.data_ptr() == layer.basis.data_ptr()
    layer(x)  # forward caches P in its own dtype; the sketch's reference stays the basis
    stepper.after_step(0.0, 0.0)
    assert layer.projection_epoch == 2 and layer.sketch.kept is layer.basis
