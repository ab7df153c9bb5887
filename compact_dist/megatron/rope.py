"""Megatron-core's rotary position embedding on CPU-only hosts.

megatron-core 0.16.1's `RotaryEmbedding.get_emb` moves its inverse frequencies to
`torch.cuda.current_device()` on the first forward whenever they are on the CPU, which fails on
a host without CUDA. `HostRotaryEmbedding` is the same module with one change: when CUDA is
not available the frequencies stay where they are (the CPU); with CUDA it is Megatron's code
unchanged. `install_host_rotary(model)` switches a built GPTModel's rotary module to it (no
new parameters or buffers: `inv_freq` is a plain attribute, so state dicts are unchanged).

Output of `get_emb`: [max_seq_len, 1, 1, kv_channels * rotary_percent], Megatron's layout
(non-interleaved: [freqs, freqs]; interleaved: each frequency twice in a row).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


class HostRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose frequencies stay on the CPU when there is no CUDA device."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        if torch.cuda.is_available() or self.inv_freq.device.type != "cpu":
            return super().get_emb(max_seq_len, offset)
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim / 2], on the CPU
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1)
        return emb[:, None, None, :]


def install_host_rotary(model: torch.nn.Module) -> torch.nn.Module:
    """Make every Megatron RotaryEmbedding in `model` a HostRotaryEmbedding (in place; a model
    without rotary embeddings is returned unchanged). Returns `model`."""
    for module in model.modules():
        if type(module) is RotaryEmbedding:
            module.__class__ = HostRotaryEmbedding
    return model
