"""FP8 storage of activations kept for backward (compact_dist.megatron.fp8_storage and its users:
swiglu, attention, norm). CPU tests plus GPU-only ones (skipped without CUDA / Triton).

Gradient bounds. Every stored element carries a relative error <= 2^-4 (e4m3 rounding, see
compact_dist.megatron.fp8_storage), about 0.027 RMS on Gaussian data (test_round_trip_rms). A
gradient that depends linearly on one stored tensor (SwiGLU's dx, a norm's weight grad)
inherits about that RMS error: the bound is 2^-4 = 0.0625. Attention's dq and dk depend on
two stored tensors (k, and the scores q k^T through the softmax derivative), and dv on the
softmax of the scores: the bound is 3 x 0.027 ~ 0.08 (measured 0.049-0.053 for unit-variance
q, k at head_dim 64).
"""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType

from compact_dist import CompressionConfig, SubspaceStepper, optimizer_param_groups
from compact_dist.megatron import fp8_storage
from compact_dist.megatron.activations import ActivationConfig
from compact_dist.megatron.attention import Fp8AttentionFunction, SDPACoreAttention, attend
from compact_dist.megatron.fp8_storage import block_size, fake_quantize, pack, unpack
from compact_dist.training.saved_tensors import saved_activation_bytes
from compact_dist.megatron.norm import Fp8LayerNorm, Fp8RMSNorm, SequenceParallelTorchNorm
from compact_dist.megatron.spec import get_compact_gpt_block_spec
from compact_dist.megatron.swiglu import Fp8SwiGLUMLP, _glu, fp8_swiglu
from compact_dist.core.subspace import assign_layer_ids
from compact_dist.training.train_config import TrainConfig
from gpt_utils import SEQ, VOCAB, loss_of, text_batch, tiny_config

GRAD_BOUND = 2.0**-4
ATTENTION_GRAD_BOUND = 0.08
NO_MODULE = torch.nn.Module()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _rows(shape, dtype, seed=0):
    """Rows N(0, 1) * sigma, sigma log-spaced 0.02..3 over the rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    sigma = torch.logspace(torch.log10(torch.tensor(0.02)), torch.log10(torch.tensor(3.0)),
                           x[..., 0].numel()).view(*shape[:-1], 1)
    return (x * sigma).to(dtype)


# ---------------------------------------------------------------------------- the format

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [256, 96])  # blocks of 128 / one scale per 96-element row
def test_round_trip_bound(dtype, n):
    x = _rows((6, 8, n), dtype)
    x[0, 0] = 0.0                                   # a zero row
    x[1, 1, :] *= 1e-4                              # a tiny row (subnormal range of e4m3)
    x[2, 2, 3] = 3e4                                # an outlier channel
    x[3, 3, 1], x[3, 4, 2], x[3, 5, 3] = float("nan"), float("inf"), -float("inf")
    payload, scales = pack(x)
    block = block_size(n)
    assert block == (128 if n == 256 else n)
    assert payload.dtype == torch.float8_e4m3fn and payload.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (6, 8, n // block)
    y = unpack(payload, scales, dtype)
    assert y.dtype == dtype and y.shape == x.shape

    xf, yf = x.float(), y.float()
    finite = torch.isfinite(xf)
    blocks = xf.where(finite, 0.0).abs().unflatten(-1, (-1, block))
    amax = blocks.amax(-1)
    # scales: powers of two with the block maximum in (224, 448]; 1 for a zero block
    mantissa, _ = torch.frexp(scales)
    assert (mantissa == 0.5).all()
    nonzero = amax > 0
    ratio = amax[nonzero] / scales[nonzero]
    assert (ratio > 224).all() and (ratio <= 448).all()
    assert (scales[~nonzero] == 1).all()
    assert (y[0, 0] == 0).all()
    # the guarantee: |err| <= max(2^-4 |x|, 2^-10 scale) <= 2^-4 amax(block), elementwise
    err = (yf - xf).abs()
    scale_el = scales.repeat_interleave(block, dim=-1)
    bound = torch.maximum(2.0**-4 * xf.abs(), 2.0**-10 * scale_el)
    assert (err[finite] <= bound[finite]).all()
    assert (err[finite] <= (2.0**-4 * amax).repeat_interleave(block, -1)[finite]).all()
    # non-finite elements come back as NaN; their block's finite elements are unaffected
    assert torch.isnan(y[~finite]).all()
    assert torch.isfinite(y[3, 4][torch.isfinite(x[3, 4])]).all()
    # the tiny row is not flushed to zero (its own scale)
    assert _rel(y[1, 1], x[1, 1]) < 0.05


def test_round_trip_rms_and_explicit_block():
    x = torch.randn(512, 256)
    assert 0.02 < _rel(fake_quantize(x), x) < 0.03   # e4m3: ~2^-4 / sqrt(3) * 0.8 RMS
    payload, scales = pack(x, block=256)              # per-row scales on request
    assert scales.shape == (512, 1)
    assert _rel(unpack(payload, scales, x.dtype), x) < 0.03
    with pytest.raises(ValueError, match="does not divide"):
        pack(x, block=100)


def test_scaled_beats_unscaled():
    """Megatron's activation_func_fp8_input_store casts without a scale: it loses small rows
    (subnormals) and saturates |x| > 448; the scaled blocks keep their bound (swiglu.py's
    docstring has the full sweep)."""

    def dx_error(stored, x, g):
        def grad(t):
            t = t.float().detach().requires_grad_()
            return torch.autograd.grad(_glu(t), t, g)[0]
        return _rel(grad(stored), grad(x))

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(128, 512, generator=gen) * 0.005).bfloat16()
    g = torch.randn(128, 256, generator=gen)
    unscaled = dx_error(x.to(torch.float8_e4m3fn).bfloat16(), x, g)
    scaled = dx_error(fake_quantize(x), x, g)
    assert scaled < GRAD_BOUND / 2 < 3 * scaled < unscaled, (scaled, unscaled)
    big = x * 2e5                                    # |x| up to ~4000
    assert _rel(big.to(torch.float8_e4m3fn).bfloat16(), big) > 0.3
    assert _rel(fake_quantize(big), big) < 0.03


# ---------------------------------------------------------------------------- SwiGLU

@pytest.fixture
def no_compile():
    """torch.compile'd functions run eagerly for the test, through torch's own config patch.
    Not monkeypatch.setattr: torch._dynamo.config keeps its values outside the module's
    __dict__, so pytest >= 9.2 (which restores from __dict__) undoes the patch with delattr,
    and torch's __delattr__ hides the key for the rest of the process."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_mlp_matches_megatron(megatron_tp1, fused, no_compile):
    """Fp8SwiGLUMLP vs Megatron's MLP, same weights: identical output, close gradients.
    fused=True runs Megatron's bias_swiglu path (torch.compile'd; compilation disabled here,
    it costs ~25 s on CPU: the same functions run eagerly)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP

    config = tiny_config(bias_activation_fusion=fused, add_bias_linear=True)
    sub = get_gpt_layer_local_spec().submodules.mlp.submodules
    torch.manual_seed(0)
    ref = MLP(config, sub, ffn_hidden_size=config.ffn_hidden_size)
    with torch.no_grad():
        ref.linear_fc1.bias.normal_(0, 0.5)   # Megatron initialises biases to zero
    mlp = Fp8SwiGLUMLP(config, sub)
    mlp.load_state_dict(ref.state_dict())
    assert mlp.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(SEQ, 2, config.hidden_size, requires_grad=True)
    g = torch.randn(SEQ, 2, config.hidden_size)
    outs = []
    for module in (ref, mlp):
        out, bias = module(x)
        outs.append(out)
        torch.autograd.backward(out + bias, g)
    assert torch.equal(outs[0], outs[1])
    grads = [(n, p.grad) for n, p in mlp.named_parameters()]
    ref_grads = dict(ref.named_parameters())
    for name, grad in grads:
        assert _rel(grad, ref_grads[name].grad) < GRAD_BOUND, name


@pytest.mark.parametrize("dtype,ratio", [(torch.bfloat16, 0.52), (torch.float32, 0.26)])
def test_swiglu_saved_bytes(dtype, ratio):
    x = (torch.randn(SEQ, 2, 512) * 0.5).to(dtype).requires_grad_()
    full = x.numel() * x.element_size()   # what Megatron's fused SwiGLU keeps (x only)
    unfused = saved_activation_bytes(lambda: _glu(x), NO_MODULE)
    ours = saved_activation_bytes(lambda: fp8_swiglu(x, None, False), NO_MODULE)
    assert unfused >= full                  # Megatron's unfused path keeps 1.5x x
    assert ours <= ratio * full             # 1 byte + 4 / 128 per element
    assert ours == x.numel() + 4 * x.numel() // 128
    with torch.no_grad():                   # nothing recorded -> nothing packed
        assert torch.equal(fp8_swiglu(x, None, False), _glu(x))


# ---------------------------------------------------------------------------- attention

def _attention(config_kw, **kw):
    config = tiny_config(**config_kw)
    return SDPACoreAttention(config, 1, AttnMaskType.causal, "self", **kw), config


@pytest.mark.parametrize("groups,mask_type", [(4, "causal"), (2, "causal"), (1, "padding")])
def test_attention_matches_sdpa(megatron_tp1, groups, mask_type):
    ref, config = _attention(dict(num_query_groups=groups))
    fp8, _ = _attention(dict(num_query_groups=groups), fp8_storage=True)
    s, b, h, d = SEQ, 2, config.num_attention_heads, config.kv_channels
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(s, b, h, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(s, b, groups, d, generator=gen, requires_grad=True) for _ in range(2))
    mask, kind = None, AttnMaskType.causal
    if mask_type == "padding":
        kind = AttnMaskType.padding
        mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
        mask[1, ..., s // 2:] = True        # Megatron: True = masked out
    g = torch.randn(s, b, h * d, generator=gen)
    out_ref = ref(q, k, v, mask, attn_mask_type=kind)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), g)
    out = fp8(q, k, v, mask, attn_mask_type=kind)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert torch.equal(out, out_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.shape == grad_ref.shape
        assert _rel(grad, grad_ref) < ATTENTION_GRAD_BOUND


@pytest.mark.parametrize("dtype,ratio", [(torch.bfloat16, 0.5), (torch.float32, 0.25)])
def test_attention_saved_bytes(dtype, ratio):
    """SDPA keeps q, k, v, out (+ logsumexp); the recompute path keeps q, k, v in FP8 (1 byte
    + 4 / head_dim per element) and no output: 0.40x in bf16. The flash path (CUDA) adds the
    FP8 output: ~0.53x (test_flash_saved_bytes)."""
    s, b, h, d = 64, 2, 4, 64
    q, k, v = (torch.randn(s, b, h, d, dtype=dtype, requires_grad=True) for _ in range(3))
    full = saved_activation_bytes(lambda: attend(q, k, v, None, True, 0.125), NO_MODULE)
    ours = saved_activation_bytes(
        lambda: Fp8AttentionFunction.apply(q, k, v, None, True, 0.125, "recompute"), NO_MODULE)
    assert full >= 4 * q.numel() * q.element_size()
    assert ours == 3 * (q.numel() + 4 * q.numel() // d)
    assert ours <= ratio * full


def test_attention_output_shares_proj_input():
    """Without FP8, SDPA's saved output and the context that linear_proj keeps are one
    storage (the final permute/reshape is a view): the reason for `share_output`."""
    s, b, h, d = 16, 2, 4, 16
    qkv = torch.randn(s, b, h, 3 * d, requires_grad=True)
    q, k, v = torch.split(qkv, d, dim=-1)
    saved = []

    def keep(t):
        saved.append(t.untyped_storage().data_ptr())
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        context = attend(q, k, v, None, True, 0.25)
    assert context.untyped_storage().data_ptr() in saved


# ---------------------------------------------------------------------------- norms

@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("dtype,ratio", [(torch.bfloat16, 0.52), (torch.float32, 0.26)])
def test_norm_matches_torch(megatron_tp1, kind, dtype, ratio):
    config = tiny_config(normalization=kind, params_dtype=dtype, sequence_parallel=False)
    ref = SequenceParallelTorchNorm(config, 256, eps=1e-5)
    norm = SequenceParallelTorchNorm(config, 256, eps=1e-5, fp8_storage=True)
    assert isinstance(norm, Fp8RMSNorm if kind == "RMSNorm" else Fp8LayerNorm)
    assert isinstance(norm, type(ref))
    assert all(hasattr(p, "sequence_parallel") for p in norm.parameters())
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    norm.load_state_dict(ref.state_dict())
    assert norm.state_dict().keys() == ref.state_dict().keys()
    x = _rows((SEQ, 2, 256), dtype).requires_grad_()
    with torch.no_grad():
        x[..., 5] *= 100                     # an outlier channel, as in residual streams
    g = torch.randn(SEQ, 2, 256, dtype=dtype)
    out_ref, out = ref(x), norm(x)
    assert torch.equal(out, out_ref)
    grads_ref = torch.autograd.grad(out_ref, (x, *ref.parameters()), g)
    grads = torch.autograd.grad(out, (x, *norm.parameters()), g)
    for grad, grad_ref in zip(grads, grads_ref):
        assert _rel(grad, grad_ref) < GRAD_BOUND
    full = x.numel() * x.element_size()
    saved = saved_activation_bytes(lambda: norm(x), norm)
    assert saved == x.numel() + 4 * x.numel() // 128 <= ratio * full
    assert saved_activation_bytes(lambda: ref(x), ref) >= full


# ---------------------------------------------------------------------------- a GPT

def _gpt(activations, compression, seed=0):
    config = tiny_config()
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=get_compact_gpt_block_spec(
        config, compression, activations=activations), vocab_size=VOCAB,
        max_sequence_length=SEQ, position_embedding_type="learned_absolute")
    assign_layer_ids(model)
    return model


def test_tiny_gpt_trains_with_all_three(megatron_tp1):
    compression = CompressionConfig(ratio=0.25, resample_interval=10)
    activations = ActivationConfig(fp8_storage=["swiglu", "attention", "norm"])
    model = _gpt(activations, compression)
    layer = model.decoder.layers[0]
    assert isinstance(layer.mlp, Fp8SwiGLUMLP)
    assert layer.self_attention.core_attention.fp8_storage
    assert isinstance(layer.input_layernorm, Fp8RMSNorm)
    assert isinstance(model.decoder.final_layernorm, Fp8RMSNorm)
    baseline = _gpt(None, compression)
    assert type(baseline.decoder.layers[0].input_layernorm) is torch.nn.RMSNorm
    batch = text_batch(seed=0)
    assert torch.equal(loss_of(model, batch), loss_of(baseline, batch))  # forward unchanged

    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.01), lr=3e-3, betas=(0.9, 0.95))
    stepper = SubspaceStepper(model, compression)
    losses = []
    for step in range(5):
        loss = loss_of(model, text_batch(seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        stepper.after_step(3e-3, 0.01, opt)
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# ---------------------------------------------------------------------------- config

def test_bad_combinations_rejected(megatron_tp1):
    with pytest.raises(ValueError, match="attention dropout"):
        TrainConfig(model={"attention_dropout": 0.1},
                    activations={"fp8_storage": ["attention"]})
    with pytest.raises(ValueError, match="selective"):
        TrainConfig(recompute={"granularity": "selective"},
                    activations={"fp8_storage": ["attention", "norm"]})
    with pytest.raises(ValueError, match="twice"):
        ActivationConfig(fp8_storage=["norm", "norm"])
    with pytest.raises(ValueError):
        ActivationConfig(fp8_storage=["logits"])
    TrainConfig(model={"attention_dropout": 0.1}, activations={"fp8_storage": ["swiglu"]})
    with pytest.raises(ValueError, match="dropout"):
        _attention(dict(attention_dropout=0.1), fp8_storage=True)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    sub = get_gpt_layer_local_spec().submodules.mlp.submodules
    with pytest.raises(ValueError, match="SwiGLU"):
        Fp8SwiGLUMLP(tiny_config(gated_linear_unit=False, activation_func=F.gelu), sub)


# ---------------------------------------------------------------------------- GPU only

@cuda
@pytest.mark.skipif(not fp8_storage.HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [4096, 64, 96, 1000, 11008])
def test_triton_pack_matches_torch(dtype, n):
    x = _rows((37, 3, n), dtype).cuda()
    x[0, 0] = 0
    x[1, 1, :7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-30, 3e4, -5, 0])
    q_t, s_t = pack(x, triton_kernel=True)
    q_ref, s_ref = pack(x, triton_kernel=False)
    assert torch.equal(s_t, s_ref)
    nan = torch.isnan(q_ref.float())
    assert torch.equal(torch.isnan(q_t.float()), nan)
    assert torch.equal(q_t.view(torch.uint8)[~nan], q_ref.view(torch.uint8)[~nan])
    y_t = unpack(q_t, s_t, dtype, triton_kernel=True)
    y_ref = unpack(q_ref, s_ref, dtype, triton_kernel=False)
    assert torch.equal(torch.isnan(y_t), torch.isnan(y_ref))
    assert torch.equal(y_t[~torch.isnan(y_t)], y_ref[~torch.isnan(y_ref)])


def _flash_inputs(groups, s=256, b=2, h=8, d=128, quantized=False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(s, b, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(s, b, groups, d, device="cuda", generator=gen, dtype=torch.bfloat16)
            for _ in range(2))
    if quantized:  # exactly representable: FP8 storage of q, k, v is lossless
        q, k, v = (fake_quantize(t) for t in (q, k, v))
    g = torch.randn(s, b, h * d, device="cuda", generator=gen, dtype=torch.bfloat16)
    return [t.requires_grad_() for t in (q, k, v)], g


_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


@cuda
@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("groups", [8, 2])
def test_fused_path_matches_recompute(groups, backend):
    from compact_dist.megatron.attention import _heads_first, sdpa_backend
    from torch.nn.attention import SDPBackend, sdpa_kernel

    (q, k, v), g = _flash_inputs(groups, quantized=True)
    scale = q.shape[-1] ** -0.5
    rep = q.shape[2] // k.shape[2]
    with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[backend])):
        heads = (_heads_first(q), _heads_first(k, rep), _heads_first(v, rep))
        if sdpa_backend(*heads, None, True, scale) != backend:
            pytest.skip(f"SDPA cannot run {backend} on this GPU / build")
        ref = attend(q, k, v, None, True, scale)
        grads_ref = torch.autograd.grad(ref, (q, k, v), g)
        results = {}
        for path, share in ((None, True), (None, False), ("recompute", False)):
            out = Fp8AttentionFunction.apply(q, k, v, None, True, scale, path, share)
            results[path, share] = out, torch.autograd.grad(out, (q, k, v), g)
    for out, _ in results.values():
        assert torch.equal(out, ref)                      # forward: the same fused kernel
    # lossless q, k, v and the exact output: fused path == recompute path (up to the fused
    # backward's accumulation order)
    for a, b in zip(results[None, True][1], results["recompute", False][1]):
        assert _rel(a, b) < 1e-2
    for a, b in zip(results["recompute", False][1], grads_ref):
        assert _rel(a, b) < 1e-2
    # with its output in FP8 the fused path stays within the attention bound
    for a, b in zip(results[None, False][1], grads_ref):
        assert _rel(a, b) < ATTENTION_GRAD_BOUND
    # and on unquantized inputs both paths are within the bound of the exact gradients
    (q, k, v), g = _flash_inputs(groups)
    with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[backend])):
        grads_ref = torch.autograd.grad(attend(q, k, v, None, True, scale), (q, k, v), g)
        for path in (backend, "recompute"):
            out = Fp8AttentionFunction.apply(q, k, v, None, True, scale, path, False)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), g), grads_ref):
                assert _rel(a, b) < ATTENTION_GRAD_BOUND


@cuda
def test_default_backend_is_sdpas_choice():
    """Without a forced path the FP8 function runs what SDPA itself would run here."""
    from compact_dist.megatron.attention import _heads_first, sdpa_backend

    (q, k, v), _ = _flash_inputs(8)
    scale = q.shape[-1] ** -0.5
    chosen = sdpa_backend(_heads_first(q), _heads_first(k), _heads_first(v), None, True, scale)
    captured = {}
    original = Fp8AttentionFunction.backward

    def spy(ctx, grad):
        captured["backend"] = ctx.backend
        return original(ctx, grad)

    Fp8AttentionFunction.backward = staticmethod(spy)
    try:
        out = Fp8AttentionFunction.apply(q, k, v, None, True, scale, None, False)
        out.float().sum().backward()
    finally:
        Fp8AttentionFunction.backward = staticmethod(original)
    assert captured["backend"] == chosen
    assert torch.equal(out, attend(q, k, v, None, True, scale))


@cuda
def test_flash_saved_bytes_and_output_sharing():
    (q, k, v), _ = _flash_inputs(8)
    scale = q.shape[-1] ** -0.5
    full = saved_activation_bytes(lambda: attend(q, k, v, None, True, scale), NO_MODULE)
    fp8 = saved_activation_bytes(
        lambda: Fp8AttentionFunction.apply(q, k, v, None, True, scale, None, False), NO_MODULE)
    assert fp8 <= 0.55 * full                        # q, k, v, out in FP8 + logsumexp
    saved = []

    def keep(t):
        saved.append(t.untyped_storage().data_ptr())
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        context = attend(q, k, v, None, True, scale)
    assert context.untyped_storage().data_ptr() in saved   # SDPA out == proj input storage


@cuda
@pytest.mark.parametrize("fused", [True, False])
def test_swiglu_cuda(fused):
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    x = _rows((512, 2, 2 * 1376), torch.bfloat16).cuda().requires_grad_()
    g = torch.randn(512, 2, 1376, device="cuda", dtype=torch.bfloat16)
    ref = bias_swiglu_impl(x, None) if fused else _glu(x)
    out = fp8_swiglu(x, None, fused)
    assert torch.equal(out, ref)
    grad_ref, = torch.autograd.grad(ref, x, g)
    grad, = torch.autograd.grad(out, x, g)
    assert _rel(grad, grad_ref) < GRAD_BOUND
