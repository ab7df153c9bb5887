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


def _main_top_eigenvectors(sketches: list[SubspaceSketch]) -> list:
    """The estimate as main computed it before issue 28's transient fix (commit 5e73071): one
    fp64 Y = S + nu Q0 per shape group kept from step 1 to step 3, the group's bases views of
    one [B, b, r] tensor. Reads the sketches without consuming them."""
    groups = {}
    for i, sk in enumerate(sketches):
        if torch.isfinite(sk.sums).all() and sk.sums.abs().amax() > 0:
            groups.setdefault((tuple(sk.sums.shape[1:]), sk.rank), []).append(i)
    out = [None] * len(sketches)
    for ((b, k), rank), members in groups.items():
        group = [sketches[i] for i in members]
        n = sum(sk.num_blocks for sk in group)
        y, gram_b, gram_y = (torch.empty(s, dtype=torch.float64)
                             for s in ((n, b, k), (n, k, k), (n, k, k)))
        for part in basis._chunks(n, b * k):
            sums, q0s, start = [], [], 0
            for sk in group:
                stop = start + sk.num_blocks
                lo, hi = max(part.start, start), min(part.stop, stop)
                if lo < hi:
                    sums.append(sk.sums[lo - start:hi - start])
                    q0s.append(sk.test_columns(slice(lo - start, hi - start)))
                start = stop
            s, q0 = torch.cat(sums).double(), torch.cat(q0s).double()
            torch.add(s, 1e-10 * torch.linalg.matrix_norm(s, keepdim=True) * q0, out=y[part])
            gram_b[part] = basis._symmetric(q0.transpose(1, 2) @ y[part])
            gram_y[part] = basis._symmetric(y[part].transpose(1, 2) @ y[part])
        transform = torch.empty((n, k, rank), dtype=torch.float64)
        per_task = max(1, 2**16 // k**2)
        for i in range(0, n, per_task):
            part = slice(i, min(n, i + per_task))
            transform[part] = basis._solve_chunk(gram_b[part], gram_y[part], rank)
        bases = torch.empty((n, b, rank), dtype=torch.float32)
        for part in basis._chunks(n, b * rank):
            bases[part] = basis._orthonormalised(y[part] @ transform[part])
        for i, p in zip(members, bases.split([sk.num_blocks for sk in group])):
            out[i] = p
    return out


@pytest.mark.parametrize("chunk", [basis.CHUNK_ELEMENTS, 16 * 12 * 5, 16 * 4 * 3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_without_a_kept_y_gives_main_bits(monkeypatch, chunk, dtype):
    """Y formed again per chunk from the sketches gives main's bits (fp32 / bf16 inputs;
    sketches of different block counts in one group, warm and Gaussian starts, one that saw
    nothing; chunks that split sketches in step 1 and step 3), every layer gets its own new
    basis tensor, and the estimate frees each sketch's S and Q0 (the sketch raises after)."""
    monkeypatch.setattr(basis, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(7)
    shapes = [(4, 16, 4), (3, 16, 4), (1, 16, 4), (5, 16, 4), (2, 32, 8), (2, 32, 8)]
    sketches = []
    for i, shape in enumerate(shapes):
        warm = i % 2 == 0
        prev = (torch.linalg.qr(torch.randn(*shape, generator=gen, dtype=torch.float64))[0]
                .float() if warm else torch.randn(*shape, generator=gen))
        sketch = SubspaceSketch(prev, "pca", seed=1, layer_id=i, epoch=2, first_block=0,
                                orthonormal=warm)
        assert (sketch.kept is None) != warm
        if i != 2:  # the third saw nothing: no new basis, its sketch is kept
            for _ in range(2):
                sketch.add_input(torch.randn(30, shape[0] * shape[1], generator=gen).to(dtype))
        sketches.append(sketch)
    expected = _main_top_eigenvectors(sketches)
    got = top_eigenvectors(sketches)
    assert [p is None for p in got] == [i == 2 for i in range(len(shapes))]
    for ours, theirs in zip(got, expected):
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)
    storages = [p.untyped_storage().data_ptr() for p in got if p is not None]
    assert len(set(storages)) == len(storages)
    assert all(p.untyped_storage().nbytes() == _bytes(p) == 4 * p.numel()
               for p in got if p is not None)
    assert [sk.stored_bytes() == 0 for sk in sketches] == [i != 2 for i in range(len(shapes))]
    with pytest.raises(RuntimeError, match="consumed by an estimate"):
        sketches[0].add_input(torch.randn(3, 64))
    assert sketches[2].sums is not None and sketches[2].top() is None


def test_orthonormal_previous_p_must_be_fp32():
    """The sketch references an orthonormal P as Q0's first columns: another dtype (a copy
    that stored_bytes would miss) is refused."""
    prev = torch.linalg.qr(torch.randn(1, 32, 8, dtype=torch.float64))[0]
    with pytest.raises(ValueError, match="fp32 basis"):
        SubspaceSketch(prev, "pca", seed=1, layer_id=0, epoch=0, first_block=0)
    with pytest.raises(ValueError, match="fp32 basis"):
        SubspaceSketch(prev.bfloat16(), "pca", seed=1, layer_id=0, epoch=0, first_block=0,
                       orthonormal=True)
