"""compression.exact_input: a role that saves X instead of Z = X P has the same gradients, and
for linear_proj (whose input SDPA keeps as the same storage) the layer saves fewer bytes."""

import pytest
import torch

from compact_dist.core.config import CompressionConfig, LayerCompression
from compact_dist.training.saved_tensors import saved_activation_bytes
from gpt_utils import SEQ, tiny_gpt
from layer_utils import build

pytestmark = pytest.mark.usefixtures("megatron_tp1")
N, M = 64, 48


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("nonzero_factor", [False, True])
def test_exact_input_gives_the_same_outputs_and_gradients(kind, nonzero_factor):
    projected = build(kind, N, M, LayerCompression(ratio=0.25))
    exact = build(kind, N, M, LayerCompression(ratio=0.25, exact_input=True))
    if nonzero_factor:  # A != 0: forward also uses Z
        factor = torch.randn_like(projected.subspace_factor)
        with torch.no_grad():
            for layer in (projected, exact):
                layer.subspace_factor.copy_(factor)
                layer.mark_factor_written()
    x = torch.randn(6, 3, N, requires_grad=True)
    g = torch.randn(6, 3, M)
    results = []
    for layer in (projected, exact):
        y, _ = layer(x)
        results.append((y, *torch.autograd.grad(y, [x, layer.subspace_factor, layer.bias], g)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    saved = [saved_activation_bytes(lambda: layer(x), layer) for layer in (projected, exact)]
    assert saved[1] == x.numel() * x.element_size() > saved[0]  # X itself, not Z


def _layer_bytes(exact_input):
    model = tiny_gpt(CompressionConfig(ratio=0.25, exact_input=exact_input))
    layer = model.decoder.layers[0]
    x = torch.randn(SEQ, 2, layer.config.hidden_size, requires_grad=True)
    return saved_activation_bytes(lambda: layer(x, attention_mask=None), layer), layer


def test_exact_proj_input_shares_sdpa_output_and_saves_z_bytes():
    exact, layer = _layer_bytes(["proj"])
    projected, _ = _layer_bytes([])
    proj = layer.self_attention.linear_proj
    z_bytes = SEQ * 2 * proj.projection.local_rank * 4  # fp32 Z of linear_proj
    assert projected - exact == z_bytes


def test_exact_input_default_and_bad_role():
    assert CompressionConfig().exact_input == ["proj"]
    assert CompressionConfig().for_role("proj").exact_input
    assert not CompressionConfig().for_role("qkv").exact_input
    with pytest.raises(ValueError, match="exact_input"):
        CompressionConfig(exact_input=["o_proj"])
