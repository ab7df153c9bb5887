"""HF -> Megatron, the inverse of compact-export: a Hugging Face LLaMA's safetensors as the
state dict of one TP rank of a plain Megatron-core GPTModel (compression disabled), and that
model built and loaded. The vocabulary rows the export dropped are padded back with zeros to
the Megatron model's size. Layouts: compact_dist/tools/export.py's "TP gathering", reversed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def hf_to_megatron_state_dict(hf_dir: str | Path, tensor_model_parallel_size: int = 1,
                              tp_rank: int = 0,
                              padded_vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The inverse of the export: HF LLaMA safetensors -> the state dict of TP rank `tp_rank`
    of a Megatron-core GPTModel built with compression disabled (Megatron's layer names and
    layouts: fused per-group QKV, per-shard [gate; up] fc1, vocab rows padded with zeros to
    padded_vocab_size, default: the HF vocabulary). fp32 tensors; no `_extra_state` keys."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    hf_dir = Path(hf_dir)
    for name in ("config.json", "model.safetensors"):
        if not (hf_dir / name).is_file():
            raise ValueError(f"{str(hf_dir / name)!r} is missing")
    c = LlamaConfig.from_pretrained(str(hf_dir))
    w = {k: v.float() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    tp, r = tensor_model_parallel_size, tp_rank
    h, heads, g = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or h // heads
    q_per_group = heads // g
    vocab = padded_vocab_size or c.vocab_size
    if heads % tp or g % tp or c.intermediate_size % tp or vocab % tp:
        raise ValueError(f"TP size {tp} does not divide heads, query groups, FFN and vocabulary")

    def rows(t: torch.Tensor) -> torch.Tensor:  # this rank's rows
        return t.chunk(tp, 0)[r]

    def cols(t: torch.Tensor) -> torch.Tensor:  # this rank's input columns
        return t.chunk(tp, 1)[r]

    def padded(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] > vocab:
            raise ValueError(f"padded vocabulary {vocab} is smaller than the HF one {t.shape[0]}")
        return rows(torch.cat([t, t.new_zeros(vocab - t.shape[0], t.shape[1])], 0))

    out = {"embedding.word_embeddings.weight": padded(w["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": w["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output_layer.weight"] = padded(w["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = w[hf + "self_attn.q_proj.weight"].view(g, q_per_group, hd, h)
        k = w[hf + "self_attn.k_proj.weight"].view(g, 1, hd, h)
        v = w[hf + "self_attn.v_proj.weight"].view(g, 1, hd, h)
        out[mg + "self_attention.linear_qkv.weight"] = rows(torch.cat([q, k, v], 1).reshape(-1, h))
        out[mg + "self_attention.linear_proj.weight"] = cols(w[hf + "self_attn.o_proj.weight"])
        out[mg + "mlp.linear_fc1.weight"] = torch.cat(
            [rows(w[hf + "mlp.gate_proj.weight"]), rows(w[hf + "mlp.up_proj.weight"])], 0)
        out[mg + "mlp.linear_fc2.weight"] = cols(w[hf + "mlp.down_proj.weight"])
        out[mg + "input_layernorm.weight"] = w[hf + "input_layernorm.weight"]
        out[mg + "pre_mlp_layernorm.weight"] = w[hf + "post_attention_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_megatron_from_hf(hf_dir: str | Path, padded_vocab_size: Optional[int] = None,
                          sequence_length: Optional[int] = None) -> torch.nn.Module:
    """A plain Megatron-core GPTModel (the compact spec with compression disabled: Megatron's
    own linears, RMSNorm, SwiGLU, RoPE with the HF rope_theta; as compact_dist.megatron.model builds
    it, plus the rotary base) on the CPU holding the HF model's weights, fp32, in eval mode.
    Needs Megatron's parallel state (its TP size and rank shard the weights)."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers import LlamaConfig

    from megatron.core.models.gpt import GPTModel

    from compact_dist.core.config import CompressionConfig
    from compact_dist.megatron.rope import install_host_rotary
    from compact_dist.megatron.spec import get_compact_gpt_block_spec

    c = LlamaConfig.from_pretrained(str(hf_dir))
    tp = ps.get_tensor_model_parallel_world_size()
    # transformers 5: rope_parameters["rope_theta"]; 4.x: rope_theta
    theta = ((getattr(c, "rope_parameters", None) or {}).get("rope_theta")
             or getattr(c, "rope_theta", 10000.0))
    config = TransformerConfig(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads, num_query_groups=c.num_key_value_heads,
        kv_channels=getattr(c, "head_dim", None), ffn_hidden_size=c.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=c.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_compact_gpt_block_spec(config, CompressionConfig(enabled=False)),
        vocab_size=padded_vocab_size or c.vocab_size,
        max_sequence_length=sequence_length or c.max_position_embeddings,
        position_embedding_type="rope", rotary_base=theta)
    install_host_rotary(model)
    state = hf_to_megatron_state_dict(hf_dir, tp, ps.get_tensor_model_parallel_rank(),
                                      model.vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"HF weights do not fit the Megatron model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()
