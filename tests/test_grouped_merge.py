"""compact_dist.core.grouped_merge: merging many layers at once (grouped by shape, chunked)
leaves every layer as its own merge_subspace would, with a constant number of GEMMs per
chunk; merge_subspace_factors uses it for the module A's (torch optimizers, ZeRO 0-2)."""


import pytest
import torch

from compact_dist.core import grouped_merge
from compact_dist.core.config import LayerCompression
from compact_dist.core.subspace import merge_subspace_factors
from layer_utils import build

pytestmark = pytest.mark.usefixtures("megatron_tp1")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layers(base_dtype: str, device: str = "cpu") -> list:
    comp = LayerCompression(ratio=0.25, base_dtype=base_dtype, row_parallel_blocks=2)
    specs = [("column", 64, 48)] * 3 + [("row", 64, 40)] * 2 + [("column", 32, 48)]
    layers = [build(kind, n, m, comp, seed=i, layer_id=100 + i).to(device)
              for i, (kind, n, m) in enumerate(specs)]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.merge_count = i  # different rounding streams per layer
            layer.subspace_factor.copy_(torch.randn(layer.subspace_factor.shape, generator=gen)
                                        .to(device))
    return layers


def _w0(layer) -> torch.Tensor:
    w = layer.weight.detach().float()
    return w if layer.weight_lo is None else w + layer.weight_lo.float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base_dtype", ["fp32", "bf16", "bf16_pair"])
@pytest.mark.parametrize("chunk_bytes", [grouped_merge.MERGE_CHUNK_BYTES, 1])
def test_grouped_merge_equals_one_merge_per_layer(monkeypatch, device, base_dtype, chunk_bytes):
    """On CUDA with a bf16 W0: the one-launch Triton kernel against one launch per layer."""
    layers = _layers(base_dtype, device)
    reference = _layers(base_dtype, device)
    before = [_w0(layer) for layer in reference]
    for layer in reference:
        layer.merge_subspace(lr=0.1, weight_decay=0.3)
    gemms = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: gemms.append(a[0].shape) or real_bmm(*a, **k))
    monkeypatch.setattr(grouped_merge, "MERGE_CHUNK_BYTES", chunk_bytes)
    grouped_merge.merge_layers(layers, lr=0.1, weight_decay=0.3)
    # 3 groups (column 64x48, row 64x40, column 32x48): one GEMM per group, or per layer
    # when a chunk holds one layer
    assert len(gemms) == (3 if chunk_bytes > 1 else len(layers))
    for got, want, start in zip(layers, reference, before):
        assert got.factor_is_zero and not got.subspace_factor.any()
        assert got.merge_count == want.merge_count
        if base_dtype == "fp32":
            torch.testing.assert_close(got.weight, want.weight, rtol=0, atol=1e-6)
        elif base_dtype == "bf16":  # the same rounding stream: equal, up to the GEMM's
            # summation order
            diff = (got.weight.float() - want.weight.float()).abs()
            ulp = want.weight.float().abs() * 2 ** -7
            assert (diff <= ulp).all() and (diff == 0).float().mean() > 0.99
        else:  # the pair's 16 bits see the bf16 delta A P^T's last bit, which the GEMM's
            # summation order may change (on CUDA): within that bit and the pair's rounding
            w0_want = _w0(want)
            diff = (_w0(got) - w0_want).abs()
            step = (w0_want - start * 0.97).abs() * 2 ** -7 + w0_want.abs() * 2 ** -15
            assert (diff <= step).all()


def test_grouped_merge_applies_decay_and_scale_to_w_eff():
    layers = _layers("fp32")
    w_eff = [layer.effective_weight() for layer in layers]
    w0 = [layer.weight.detach().clone() for layer in layers]
    merge_subspace_factors(torch.nn.ModuleList(layers), lr=0.2, weight_decay=0.5)
    for layer, eff, base in zip(layers, w_eff, w0):
        torch.testing.assert_close(layer.weight, eff - 0.1 * base, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.effective_weight(), layer.weight)


def test_unproject_many_matches_unproject():
    from compact_dist.core.projection import operand, unproject

    gen = torch.Generator().manual_seed(0)
    for kb in (1, 2, 4):
        a = torch.randn(3, 10, kb * 5, generator=gen)
        blocks = torch.randn(3, kb, 8, 5, generator=gen)
        # the blocks, and the stacked operands the merge multiplies with (matrices for kb <= 2)
        for p in (blocks, torch.stack([operand(b) for b in blocks])):
            got = grouped_merge.unproject_many(a, p)
            for i in range(3):
                torch.testing.assert_close(got[i], unproject(a[i], blocks[i]))
