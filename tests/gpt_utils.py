import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from compact_dist.core.config import CompressionConfig
from compact_dist.megatron.model import build_gpt_model

VOCAB, SEQ = 128, 32


def tiny_config(**overrides) -> TransformerConfig:
    kw = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_dropout_fusion=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def tiny_gpt(compression: CompressionConfig, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_gpt_model(tiny_config(**overrides), compression, VOCAB, SEQ, "learned_absolute")


def text_batch(batch: int = 4, seed: int = 0):
    """Token ids of real-looking text (a repeated English sentence, byte-level)."""
    text = ("the quick brown fox jumps over the lazy dog while the cat sleeps. " * 64).encode()
    ids = torch.tensor(list(text), dtype=torch.long) % VOCAB
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - SEQ - 1, (batch,), generator=gen)
    tokens = torch.stack([ids[s:s + SEQ] for s in starts])
    labels = torch.stack([ids[s + 1:s + SEQ + 1] for s in starts])
    positions = torch.arange(SEQ).unsqueeze(0).expand(batch, -1)
    return tokens, positions, labels


def loss_of(model, batch):
    tokens, positions, labels = batch
    return model(tokens, positions, None, labels=labels).float().mean()
