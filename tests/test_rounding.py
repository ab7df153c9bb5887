"""The bf16 merge with stochastic rounding (compact_dist.core.rounding): torch path on CPU, the
fused Triton kernel on CUDA. Both must round to a bf16 neighbour of the exact fp32 value,
be unbiased, and be a function of the seed only (data-parallel replicas stay identical)."""

import pytest
import torch

from compact_dist.core.rounding import merge_into_bf16_, triton_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_merge_rounds_to_a_neighbour_unbiased_and_seeded(device):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(20000, generator=gen)).to(torch.bfloat16).to(device)
    delta = (torch.randn(20000, generator=gen) * 3e-3).to(device)
    scale, decay = 0.7, 1 - 1e-4
    exact = w.float() * decay + scale * delta.float()
    outs = []
    for seed in range(64):
        base = w.clone()
        merge_into_bf16_(base, delta, scale, decay, seed * 7919 + 1)
        outs.append(base.float())
    outs = torch.stack(outs)
    # every result is the floor or the ceiling of the exact value in bf16
    lo = exact.to(torch.bfloat16).float()
    step = (lo.abs() * 2 ** -7).clamp_min(2 ** -133)
    assert ((outs - exact).abs() <= step * 1.0001).all()
    # unbiased: the mean over seeds is much closer than round-to-nearest's error
    err_mean = (outs.mean(0) - exact).abs().mean()
    err_nearest = (lo - exact).abs().mean()
    assert err_mean < 0.3 * err_nearest
    # a function of the seed only
    again = w.clone()
    merge_into_bf16_(again, delta, scale, decay, 1)
    assert torch.equal(again.float(), outs[0])
    assert not torch.equal(outs[0], outs[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="bf16"):
        merge_into_bf16_(torch.zeros(4), torch.zeros(4), 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="bf16"):
        merge_into_bf16_(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(3), 1.0, 1.0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_path_is_used_on_cuda():
    assert triton_available(torch.zeros(1, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_many_bases_in_one_call_give_the_bits_of_one_call_each(device):
    from compact_dist.core.rounding import merge_into_bf16_many_

    gen = torch.Generator().manual_seed(1)
    bases = [torch.randn(5000, generator=gen).to(torch.bfloat16).to(device) for _ in range(3)]
    # rows of a wider tensor (a ZeRO-3 partition's slice of A P^T): strided, rows contiguous
    wide = (torch.randn(3, 5100, generator=gen) * 3e-3).to(torch.bfloat16).to(device)
    deltas = wide.narrow(1, 60, 5000)
    seeds = [11, 2**62 + 5, 7]
    singles = [b.clone() for b in bases]
    for base, delta, seed in zip(singles, deltas, seeds):
        merge_into_bf16_(base, delta, 0.5, 1 - 1e-3, seed)
    merge_into_bf16_many_(bases, deltas, 0.5, 1 - 1e-3, seeds)
    for got, want in zip(bases, singles):
        assert torch.equal(got, want)
    assert not torch.equal(bases[0], bases[2])  # different seeds, different draws
    with pytest.raises(ValueError, match="seed per base"):
        merge_into_bf16_many_(bases, deltas, 0.5, 1.0, seeds[:2])
    with pytest.raises(ValueError, match="one length"):
        merge_into_bf16_many_(bases, deltas[:, :10], 0.5, 1.0, seeds)


def test_successive_merges_round_independently(megatron_tp1):
    """N merges of the same delta d (|d| < one ulp) into a bf16 W0 on one binade: each element
    ends within the binomial spread of W0 + N d (the merge count is in the rounding seed, so
    each merge draws new noise). With one seed for every merge an element would round the
    same way N times (moving 0 or N ulps): an error sqrt(N) times larger."""
    from compact_dist.core.config import LayerCompression
    from compact_dist.core.subspace import merge_subspace_factors
    from layer_utils import build

    layer = build("column", 64, 48, LayerCompression(ratio=0.25, base_dtype="bf16"))
    ulp, merges = 2.0 ** -7, 32  # W0 in [1.25, 1.75]: one binade, ulp 2^-7
    with torch.no_grad():
        layer.weight.fill_(1.5)
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(layer.subspace_factor.shape, generator=gen)
        layer.subspace_factor.copy_(a)
        d = layer.effective_weight() - 1.5
        a *= 0.5 * ulp / d.abs().max()  # |d| <= ulp / 2
        d *= 0.5 * ulp / d.abs().max()
        for _ in range(merges):
            layer.subspace_factor.copy_(a)
            merge_subspace_factors(torch.nn.ModuleList([layer]), lr=0.0, weight_decay=0.0)
    ups = (layer.weight.float() - 1.5 - merges * d) / ulp  # error in ulps, per element
    q = torch.frac(d / ulp).abs()  # each merge rounds up (or down) with probability q
    variance = (merges * q * (1 - q)).mean()
    assert ups.pow(2).mean() <= 1.2 * variance, (ups.pow(2).mean(), variance)
    assert ups.mean().abs() <= 4 * (variance / ups.numel()).sqrt()  # unbiased
