"""The model compact-train trains: Megatron's TransformerConfig of a TrainConfig, the padded
vocabulary, and the GPT with compact layers per cfg.compression (compact_dist.megatron.model)
on its device. The tools (memory_plan, memory_report) and benchmarks build the same model."""

from __future__ import annotations

import torch

from compact_dist.training.train_config import TrainConfig


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """Megatron-style padding: a multiple of 64 x TP, so every TP shard is 64-aligned."""
    multiple = 64 * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def transformer_config(cfg: TrainConfig, bf16: bool):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, r = cfg.model, cfg.recompute
    fused = cfg.activations.swiglu_fusion(torch.cuda.is_available())
    recompute = {}
    if r.granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=r.num_layers)
    elif r.granularity == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout, bias_dropout_fusion=fused,
        bias_activation_fusion=fused,
        init_method_std=m.init_std,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        **recompute,
    )


def build_model(cfg: TrainConfig, device: torch.device, bf16: bool, vocab_size: int,
                cpu_init: bool = False):
    """The GPT of `cfg` (compact layers per cfg.compression) on `device`, vocabulary padded,
    with the TP all-reduce hooks of sequence-parallel gradients. Needs the parallel state.
    cpu_init: Megatron initialises each full matrix on CPU and slices it (the same weights at
    any TP size)."""
    from compact_dist.megatron.sequence_parallel import allreduce_sequence_parallel_grads
    from compact_dist.megatron.model import build_gpt_model
    from compact_dist.megatron.rope import install_host_rotary

    mcfg = transformer_config(cfg, bf16)
    if cpu_init:
        mcfg.use_cpu_initialization = True
    position = None if cfg.model.position_embedding == "auto" else cfg.model.position_embedding
    torch.manual_seed(cfg.train.seed)
    vocab = padded_vocab_size(vocab_size, cfg.parallel.tensor_model_parallel_size)
    model = build_gpt_model(mcfg, cfg.compression, vocab, cfg.model.seq_length, position,
                            cfg.activations)
    install_host_rotary(model)  # RoPE on CPU-only hosts (megatron-core 0.16.1 assumes CUDA)
    model.to(device)
    allreduce_sequence_parallel_grads(model)
    return model
