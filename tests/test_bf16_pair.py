"""base_dtype 'bf16_pair': W0 = weight + weight_lo, two bf16 words (compact_dist.core.rounding).

The GEMMs read `weight`, the bf16 operand an fp32 W0 would be cast to; the merge keeps W0 to
about 16 significant bits, unbiased, where a bf16 W0 keeps 8 (stochastically rounded) and
fp32 24."""

import pytest
import torch

from compact_dist.core.config import LayerCompression
from compact_dist.core.rounding import merge_into_bf16_, merge_into_bf16_many_
from layer_utils import build

N, M = 64, 48
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PAIR = LayerCompression(ratio=0.25, base_dtype="bf16_pair", row_parallel_blocks=2)


def _w0(layer) -> torch.Tensor:
    return layer.weight.float() + layer.weight_lo.float()


@pytest.mark.parametrize("device", DEVICES)
def test_pair_merge_rounds_high_to_nearest_and_low_unbiased(device):
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(20000, generator=gen) * 0.02
    hi0 = full.to(torch.bfloat16)
    lo0 = (full - hi0.float()).to(torch.bfloat16)
    delta = (torch.randn(20000, generator=gen) * 1e-5).to(device)
    scale, decay = 0.7, 1 - 1e-4
    exact = (hi0.float() + lo0.float()).to(device) * decay + scale * delta
    outs = []
    for seed in range(64):
        hi, lo = hi0.clone().to(device), lo0.clone().to(device)
        merge_into_bf16_(hi, delta, scale, decay, seed * 7919 + 1, lo)
        # the high word is the operand an fp32 W0 holding `exact` would be cast to
        assert torch.equal(hi, exact.to(torch.bfloat16))
        outs.append(hi.float() + lo.float())
    outs = torch.stack(outs)
    rest = exact - exact.to(torch.bfloat16).float()
    # bf16 spacing at the rest, or one fp32 ulp of the value (the kernel's fused multiply-add
    # may round v differently from torch's two steps)
    step = torch.maximum(rest.abs() * 2 ** -7, exact.abs() * 2 ** -23).clamp_min(2 ** -133)
    assert ((outs - exact).abs() <= step * 1.0001).all()
    assert ((outs - exact).abs() <= exact.abs() * 2 ** -16).all()  # ~16 significant bits
    err_mean = (outs.mean(0) - exact).abs().mean()
    err_nearest = (rest.to(torch.bfloat16).float() - rest).abs().mean()
    assert err_mean < 0.3 * err_nearest  # unbiased
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("device", DEVICES)
def test_many_pairs_in_one_call_give_the_bits_of_one_call_each(device):
    gen = torch.Generator().manual_seed(1)
    his = [torch.randn(5000, generator=gen).to(torch.bfloat16).to(device) for _ in range(3)]
    los = [(torch.randn(5000, generator=gen) * 2 ** -10).to(torch.bfloat16).to(device)
           for _ in range(3)]
    deltas = (torch.randn(3, 5100, generator=gen) * 3e-3).to(torch.bfloat16).to(device)
    deltas = deltas.narrow(1, 60, 5000)
    seeds = [11, 2 ** 62 + 5, 7]
    singles = [(h.clone(), l.clone()) for h, l in zip(his, los)]
    for (hi, lo), delta, seed in zip(singles, deltas, seeds):
        merge_into_bf16_(hi, delta, 0.5, 1 - 1e-3, seed, lo)
    merge_into_bf16_many_(his, deltas, 0.5, 1 - 1e-3, seeds, los)
    for hi, lo, (want_hi, want_lo) in zip(his, los, singles):
        assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)
    with pytest.raises(ValueError, match="lows"):
        merge_into_bf16_many_(his, deltas, 0.5, 1.0, seeds, los[:2])


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("kind", ["column", "row"])
def test_pair_layer_holds_w0_in_two_words_and_multiplies_the_high_one(kind):
    fp32 = build(kind, N, M, LayerCompression(ratio=0.25, row_parallel_blocks=2))
    layer = build(kind, N, M, PAIR)
    assert layer.weight.dtype == layer.weight_lo.dtype == torch.bfloat16
    assert not layer.weight.requires_grad and layer.weight_lo.abs().max() > 0
    # the same initial W0 (fp32 init on CPU) to the pair's precision
    w0 = fp32.weight.detach()
    assert ((_w0(layer) - w0).abs() <= w0.abs() * 2 ** -16).all()
    torch.testing.assert_close(layer.effective_weight(), _w0(layer), rtol=0, atol=0)
    # forward and backward multiply the high word (A is zero)
    x = torch.randn(4, 2, N, requires_grad=True)
    y, _ = layer(x)
    torch.testing.assert_close(y, x @ layer.weight.float().t() + layer.bias,
                               rtol=1e-5, atol=1e-5)
    dx, = torch.autograd.grad(y, [x], torch.ones_like(y))
    torch.testing.assert_close(dx, torch.ones_like(y) @ layer.weight.float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("megatron_tp1")
def test_pair_survives_dtype_moves_and_state_dict_round_trips():
    layer = build("column", N, M, PAIR)
    lo = layer.weight_lo.clone()
    names = [n for n, _ in layer.named_parameters()]
    for move in (layer.float, layer.bfloat16, lambda: layer.to(torch.float64)):
        move()
        assert layer.weight.dtype == layer.weight_lo.dtype == torch.bfloat16
        assert torch.equal(layer.weight_lo, lo)
    layer.bfloat16()
    assert [n for n, _ in layer.named_parameters()] == names
    state = layer.state_dict()
    assert torch.equal(state["weight_lo"], lo)
    other = build("column", N, M, PAIR, seed=3)
    other.bfloat16()
    assert not torch.equal(other.weight_lo, lo)
    other.load_state_dict(state)
    assert torch.equal(other.weight_lo, lo) and torch.equal(other.weight, layer.weight)
    plain = build("column", N, M, LayerCompression(ratio=0.25))
    assert plain.weight_lo is None and "weight_lo" not in plain.state_dict()


@pytest.mark.usefixtures("megatron_tp1")
def test_pair_tracks_an_fp32_w0_over_many_merges_where_bf16_drifts():
    """300 merges of updates far below bf16's resolution (W0 ~ 0.04 moves 1e-3 in all): the
    pair stays within ~2^-14 of the fp32 W0 (the random walk of its low word's stochastic
    rounding), a bf16 W0 (stochastic rounding) strays ~200x further."""
    layers = {base: build("row", N, M, LayerCompression(ratio=0.25, base_dtype=base,
                                                        row_parallel_blocks=2))
              for base in ("fp32", "bf16_pair", "bf16")}
    start = layers["bf16"].weight.detach().float()  # one start value all three hold exactly
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(start)
            if layer.weight_lo is not None:
                layer.weight_lo.zero_()
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        a = torch.randn(layers["fp32"].subspace_factor.shape, generator=gen) * 2e-6
        for layer in layers.values():
            with torch.no_grad():
                layer.subspace_factor.copy_(a)
            layer.merge_subspace(lr=1e-3, weight_decay=0.1)
    ref = layers["fp32"].weight.detach()
    moved = (ref - start).abs().mean()
    pair_err = (_w0(layers["bf16_pair"]) - ref).abs().mean()
    bf16_err = (layers["bf16"].weight.float() - ref).abs().mean()
    # measured: pair 1.8e-6 (0.15% of the distance W0 moved, 2^-14.4 of |W0|), bf16 4e-4
    assert pair_err < 2 ** -13 * ref.abs().mean(), (pair_err, ref.abs().mean())
    assert pair_err < 3e-3 * moved and bf16_err > 50 * pair_err, (pair_err, bf16_err, moved)


@pytest.mark.usefixtures("megatron_tp1")
def test_pair_merge_needs_its_low_words():
    from compact_dist.core.grouped_merge import apply_rows

    layer = build("column", N, M, PAIR)
    rows = layer.subspace_factor.detach().unsqueeze(0)
    with pytest.raises(ValueError, match="low words"):
        apply_rows([layer], rows, [layer.weight.view(-1)], 0, 0, 1.0)
    with pytest.raises(ValueError, match="bf16-pair"):
        layer.merge_subspace(base_flat=layer.weight.view(-1)[:10], base_start=0)


def _sharded_at_tp2(rank):
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    for kind in ("column", "row"):
        layer = build(kind, N, M, PAIR)
        sharded = layer.sharded_state_dict(prefix="l.", metadata={"dp_cp_group": group})
        weight, low = sharded["l.weight"], sharded["l.weight_lo"]
        assert low.data is layer.weight_lo
        assert max(weight.axis_fragmentations) == 2, kind  # split over the 2 TP ranks
        assert (low.global_shape, low.global_offset, low.axis_fragmentations) == (
            weight.global_shape, weight.global_offset, weight.axis_fragmentations), kind


def test_pair_low_word_is_sharded_like_the_weight():
    """Megatron's distributed checkpoint splits the low word over TP as it splits W0."""
    from distributed import run_distributed

    run_distributed(_sharded_at_tp2, 2, tp=2)
