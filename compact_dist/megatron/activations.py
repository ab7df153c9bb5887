"""Typed settings of what the model keeps for backward beyond the CompAct linears.

`ActivationConfig` is the `activations:` section of a run (and an argument of
`compact_dist.megatron.model.build_gpt_model`). Each option is independent of CompAct (the baseline
can use it too) and of the others:
- fused_swiglu: Megatron's fused SwiGLU and bias-dropout-add (`bias_activation_fusion`,
  `bias_dropout_fusion`; both on by default in Megatron-LM, `--no-bias-swiglu-fusion` turns
  the first off): SwiGLU saves the fc1 output only. None (default) = on with CUDA, off on
  CPU, where megatron-core's torch.compile'd fusions cost ~25 s of compilation per process
  and gain nothing.
- fused_cross_entropy / cross_entropy_chunk_tokens: the output layer and vocab-parallel
  cross-entropy computed over chunks of tokens, never holding the micro-batch's logits
  (exact; compact_dist.megatron.cross_entropy).
- fp8_storage: tensors kept for backward in FP8 (e4m3, a power-of-two fp32 scale per 128
  elements; lossy): 'swiglu' (the SwiGLU input), 'attention' (SDPA's q, k, v and output),
  'norm' (the RMSNorm / LayerNorm inputs); compact_dist.megatron.fp8_storage. Each entry at most
  once; 'attention' rejects attention dropout > 0 (its recompute backward cannot replay
  SDPA's dropout mask) and selective recompute (the core attention is recomputed: nothing
  to store), checked by `check_model` from TrainConfig.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

Fp8Tensor = Literal["swiglu", "attention", "norm"]


class ActivationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fused_swiglu: Optional[bool] = None
    fused_cross_entropy: bool = False
    cross_entropy_chunk_tokens: int = Field(2048, ge=1)
    fp8_storage: list[Fp8Tensor] = Field(default_factory=list)

    @field_validator("fp8_storage")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"fp8_storage lists an entry twice: {value}")
        return value

    def check_model(self, attention_dropout: float, recompute_granularity: str) -> None:
        """Combinations with the model / recompute settings (TrainConfig calls this)."""
        if "attention" in self.fp8_storage:
            if attention_dropout > 0:
                raise ValueError(
                    "activations.fp8_storage 'attention' does not support attention dropout "
                    f"(model.attention_dropout={attention_dropout}); set it to 0")
            if recompute_granularity == "selective":
                raise ValueError(
                    "activations.fp8_storage 'attention' has nothing to store under "
                    "recompute.granularity=selective (core attention is recomputed)")

    def swiglu_fusion(self, has_cuda: bool) -> bool:
        return has_cuda if self.fused_swiglu is None else self.fused_swiglu
