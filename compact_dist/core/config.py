"""Typed, validated compression settings.

`CompressionConfig` is what a user writes (YAML / CLI overrides); `LayerCompression` is the
resolved setting of one linear role (qkv, proj, fc1, fc2) that a layer is built with.
Every bad value raises one `ValueError` (pydantic's ValidationError subclasses it) at load,
before any process group exists.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compact_dist.core.projection_kinds import UNBIASED_DEFAULT, ProjectionName, projection_kind

LinearRole = Literal["qkv", "proj", "fc1", "fc2"]
ALL_ROLES: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
# Megatron passes tp_comm_buffer_name=<role> to each of the four GPT linears.
COLUMN_ROLES = ("qkv", "fc1")
DEFAULT_RATIO = 0.25
ROW_ROLES = ("proj", "fc2")


class LayerCompression(BaseModel):
    """Resolved compression of one linear layer.

    Exactly one of `ratio` (r = round(ratio * in_features)) and `rank` (absolute r) is set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["subspace", "unbiased"] = "subspace"
    ratio: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    rank: Optional[int] = Field(default=None, ge=1)
    seed: int = Field(default=1234, ge=0)
    base_dtype: Literal["fp32", "bf16", "bf16_pair"] = "fp32"
    row_parallel_blocks: int = Field(default=8, ge=1)
    update_scale: float = Field(default=1.0, gt=0.0)
    exact_input: bool = False

    @model_validator(mode="after")
    def _one_size(self) -> "LayerCompression":
        if (self.ratio is None) == (self.rank is None):
            raise ValueError("set exactly one of 'ratio' (0 < ratio <= 1) and 'rank' (>= 1)")
        return self

    def rank_for(self, in_features: int, num_blocks: int) -> int:
        """Total projection rank r for a layer with `in_features` global input columns whose
        projection is split into `num_blocks` diagonal blocks (r is a multiple of num_blocks)."""
        if in_features % num_blocks:
            raise ValueError(
                f"in_features={in_features} is not divisible into {num_blocks} projection blocks"
                " (compression.row_parallel_blocks)"
            )
        block_in = in_features // num_blocks
        if self.rank is not None:
            if self.rank % num_blocks:
                raise ValueError(
                    f"compression.rank={self.rank} must be a multiple of the {num_blocks} "
                    "projection blocks (compression.row_parallel_blocks)"
                )
            per_block = self.rank // num_blocks
        else:
            per_block = max(1, round(self.ratio * block_in))
        if per_block > block_in:
            raise ValueError(
                f"compression.rank={self.rank}: rank per block {per_block} exceeds the block's "
                f"{block_in} input columns"
            )
        return per_block * num_blocks


class CompressionConfig(BaseModel):
    """User-facing CompAct settings for a GPT model.

    mode: 'subspace' (frozen W0 + trainable A, the paper's update rule) or 'unbiased'
        (trainable W with the gradient G P P^T, activation memory only).
    ratio / rank: compression size (default ratio 0.25); `ratios` overrides it per role.
    resample_interval: T, draw a new projection every T optimizer steps.
    base_dtype: storage of the frozen W0 in subspace mode: 'fp32'; 'bf16' (merges with
        stochastic rounding; half the bytes); 'bf16_pair' (W0 = hi + lo, two bf16 words: 4
        bytes like fp32, ~16 significant bits, the GEMMs read hi with no cast, which an
        fp32 W0 pays in every forward and backward, so with fp32 activations the GEMMs see
        W0 to bf16 precision; not with ZeRO-3; see compact_dist.core.rounding).
    row_parallel_blocks: number of diagonal blocks of P for row-parallel layers; it must be
        divisible by the tensor-parallel size, which keeps TP=1,2,4,... on identical math.
    layers: which of the four GPT linears are compressed; the rest stay Megatron's.
    projection: 'gaussian' (seeded, the paper's), 'pca' (top-r principal directions of the
        layer's input, estimated in the forward passes of the resample step) or 'gradient'
        (top-r right singular vectors of the weight gradient, from one extra probe micro-batch
        with uncompressed inputs at each resample); see compact_dist.core.basis. Data-aware P is
        first estimated in step 1 and re-estimated every `resample_interval` steps.
    update_scale: alpha in W <- W - lr * alpha * rho(G P) P^T (W_eff = W0 + alpha A P^T).
        With an orthonormal (data-aware) P, 1.0 moves W along each kept direction by the
        step full-rank Adam takes per coordinate; with the Gaussian N(0, 1/r) P it is the
        paper's rule with alpha = 1 (the paper uses 0.25 with its own learning rates).
    moments_on_resample: what happens to Adam moments of A when P changes: 'keep' (the
        paper's), 'reset' (zero moments and step count, so bias correction restarts) or
        'transport' (first moment mapped into the new basis, M <- M R with
        R = P_old^+ P_new; second moment V <- V (R o R), see compact_dist.core.moments).
    exact_input: roles whose layer saves its exact input X for backward instead of Z = X P
        (same gradients, Z is formed in backward). Default ['proj']: linear_proj's input is
        SDPA's output, which SDPA keeps anyway as the same storage, so saving X costs nothing
        and Z's r columns are saved too (FP8 attention storage then references that X
        instead of keeping an FP8 copy). Roles not compressed are ignored.
    Defaults: projection 'pca' with moments 'transport'. Unless set explicitly, mode
    'unbiased' takes projection 'gaussian' (its gradient G P P^T is unbiased only for a random
    P), and projection 'gaussian' takes moments 'keep' (consecutive Gaussian draws are
    independent: transport would keep almost nothing of the moments).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    mode: Literal["subspace", "unbiased"] = "subspace"
    ratio: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    rank: Optional[int] = Field(default=None, ge=1)
    ratios: dict[LinearRole, float] = Field(default_factory=dict)
    seed: int = Field(default=1234, ge=0)
    resample_interval: int = Field(default=200, ge=1)
    base_dtype: Literal["fp32", "bf16", "bf16_pair"] = "fp32"
    row_parallel_blocks: int = Field(default=8, ge=1)
    layers: list[LinearRole] = Field(default_factory=lambda: list(ALL_ROLES))
    moments_on_resample: Literal["keep", "reset", "transport"] = "transport"
    projection: ProjectionName = "pca"
    update_scale: float = Field(default=1.0, gt=0.0)
    exact_input: list[LinearRole] = Field(default_factory=lambda: ["proj"])

    @model_validator(mode="after")
    def _check(self) -> "CompressionConfig":
        if self.ratio is not None and self.rank is not None:
            raise ValueError("set only one of 'ratio' and 'rank'")
        if self.ratio is None and self.rank is None:
            self.ratio = DEFAULT_RATIO
        for role, value in self.ratios.items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"ratios[{role}]={value} must satisfy 0 < ratio <= 1")
        if self.rank is not None and self.ratios:
            raise ValueError("per-role 'ratios' cannot be combined with an absolute 'rank'")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"'layers' lists a role twice: {self.layers}")
        given = self.model_fields_set
        if self.mode == "unbiased" and "projection" not in given:
            self.projection = UNBIASED_DEFAULT  # unbiased needs E[P P^T] = I: a random P
        if "moments_on_resample" not in given:  # gaussian: independent draws, nothing to
            self.moments_on_resample = self.kind.default_moments  # transport
        return self

    @property
    def kind(self):
        """The projection as a compact_dist.core.projection_kinds.ProjectionKind."""
        return projection_kind(self.projection)

    @classmethod
    def from_yaml(cls, path: str) -> "CompressionConfig":
        """The settings of a YAML file (the keys of this class at its top level)."""
        from compact_dist.core.config_loading import read_yaml_mapping, validate

        return validate(cls, read_yaml_mapping(path))

    def for_role(self, role: str) -> Optional[LayerCompression]:
        """The resolved setting for one linear role, or None when that role stays uncompressed."""
        if not self.enabled or role not in self.layers:
            return None
        return LayerCompression(
            mode=self.mode,
            ratio=self.ratios.get(role, self.ratio) if self.rank is None else None,
            rank=self.rank,
            seed=self.seed,
            base_dtype=self.base_dtype,
            row_parallel_blocks=self.row_parallel_blocks,
            update_scale=self.update_scale,
            exact_input=role in self.exact_input,
        )

    def check_parallel(self, tensor_model_parallel_size: int) -> None:
        """Raise before any process group is created if TP cannot split the projection."""
        if not self.enabled:
            return
        if any(r in ROW_ROLES for r in self.layers) and (
            self.row_parallel_blocks % tensor_model_parallel_size
        ):
            raise ValueError(
                f"compression.row_parallel_blocks={self.row_parallel_blocks} must be divisible "
                f"by the tensor-model-parallel size {tensor_model_parallel_size}"
            )
