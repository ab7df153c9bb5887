"""Typed configuration of a `compact-train` run: YAML file + `section.key=value` overrides.

`load_train_config` validates everything it can before any process group exists: field
ranges (pydantic), divisibility of heads / FFN / batch by the parallel sizes (the world size
comes from the launcher's environment), the compression rank of every compressed linear for
the model's shapes, supported combinations, and that data paths exist. Every error is one
`ValueError` line naming the key (compact_dist.core.config_loading); docs/BAD_INPUT.md lists
them.
"""

from __future__ import annotations

import os
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compact_dist.megatron.activations import ActivationConfig
from compact_dist.core.config import ROW_ROLES, CompressionConfig
from compact_dist.core.config_loading import validate, read_yaml_mapping, yaml_error_line
from compact_dist.training.data import DataConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """LLaMA-style GPT: RMSNorm, SwiGLU, no biases, rotary positions."""

    num_layers: int = Field(4, ge=1, description="transformer layers")
    hidden_size: int = Field(128, ge=8, description="model width h")
    num_attention_heads: int = Field(4, ge=1, description="attention heads (head dim = "
                                     "hidden_size / heads)")
    num_query_groups: Optional[int] = Field(None, ge=1, description="key/value heads "
                                            "(grouped-query attention); null: one per head")
    ffn_hidden_size: Optional[int] = Field(None, ge=1, description="SwiGLU width; null: 8/3 "
                                           "hidden rounded down to a multiple of 64")
    seq_length: int = Field(128, ge=8, description="tokens per sequence")
    position_embedding: Literal["rope", "learned_absolute", "auto"] = Field(
        "rope", description="rope (rotary, on CPU too; what compact-export needs) or "
        "learned_absolute; auto (older configs): rope with CUDA, learned without")
    init_std: float = Field(0.02, gt=0, description="std of the normal weight init")
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="dropout after attention and "
                                  "MLP")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention "
                                     "probabilities")

    @property
    def ffn(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return max(64, int(8 * self.hidden_size / 3) // 64 * 64)

    @property
    def kv_channels(self) -> int:
        """Key / value width: query groups x head dim (GQA), hidden_size without GQA."""
        groups = self.num_query_groups or self.num_attention_heads
        return groups * (self.hidden_size // self.num_attention_heads)

    def linear_shapes(self) -> dict[str, tuple[str, int, int]]:
        """Per GPT linear role of one layer: (the key its input width comes from, global
        input features, global output features)."""
        h, ffn = self.hidden_size, self.ffn
        return {"qkv": ("model.hidden_size", h, h + 2 * self.kv_channels),
                "proj": ("model.hidden_size", h, h),
                "fc1": ("model.hidden_size", h, 2 * ffn),
                "fc2": ("model.ffn_hidden_size", ffn, h)}


class ParallelConfig(_Section):
    tensor_model_parallel_size: int = Field(1, ge=1, description="Megatron tensor-parallel "
                                            "size TP (data-parallel size = world / TP)")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism "
                                    "(needs TP > 1 and CUDA)")


class OptimConfig(_Section):
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW)")
    min_lr: float = Field(2e-4, ge=0, description="learning rate at the end of the cosine "
                          "decay")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay (not on norms "
                                "or biases)")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam beta2")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this "
                             "(0: off)")


class TrainLoopConfig(_Section):
    """offload_optimizer cpu: DeepSpeed's ZeRO-Offload of the optimizer
    (zero_optimization.offload_optimizer; compact_dist.deepspeed.engine.deepspeed_config);
    the client torch AdamW steps the host partitions (its fused CPU kernel runs as fast as
    DeepSpeedCPUAdam, which needs a C++ toolchain to build)."""

    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per forward")
    global_batch_size: Optional[int] = Field(None, ge=1, description="sequences per optimizer "
                                             "step; null: micro x data-parallel (gradient "
                                             "accumulation makes up the rest)")
    train_steps: int = Field(400, ge=1, description="optimizer steps of the run")
    seed: int = Field(1234, ge=0, description="model init and dropout seed")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 with "
                                                       "CUDA, fp32 on CPU")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage; with "
                                            "engine fsdp2: 3 (reshard after forward) or 2 "
                                            "(keep parameters gathered until backward)")
    engine: Literal["deepspeed", "fsdp2"] = Field(
        "deepspeed", description="deepspeed (ZeRO 0-3) or fsdp2 (torch fully_shard over "
        "the data-parallel group, fp32; megatron-core 0.16.1's own DDP and distributed "
        "optimizer need CUDA)")
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="cpu: ZeRO-Offload, the fp32 masters, Adam moments and fp32 "
        "gradients of this rank's partition in host memory, the AdamW step on the CPU "
        "(needs zero_stage >= 1)")
    offload_pin_memory: bool = Field(True, description="page-locked host buffers for the "
                                     "offloaded optimizer (faster copies)")
    log_interval: int = Field(20, ge=1, description="steps between progress lines")
    eval_interval: int = Field(100, ge=1, description="steps between validations")
    eval_batches: int = Field(8, ge=1, description="micro-batches per validation")


class RecomputeConfig(_Section):
    """Megatron recompute ('full' per layer or 'selective' core attention), optionally run
    through deepspeed.checkpointing instead of Megatron's tensor_parallel.checkpoint."""

    granularity: Literal["none", "full", "selective"] = Field(
        "none", description="Megatron activation recompute: full layers or selective (core "
        "attention)")
    num_layers: int = Field(1, ge=1, description="layers per recompute chunk (full)")
    deepspeed_checkpointing: bool = Field(False, description="recompute through "
                                          "deepspeed.checkpointing instead of Megatron's")


class CheckpointConfig(_Section):
    """dir: where checkpoints go (checked writable before step 1); resume: from load_step's
    checkpoint, else the one `latest` names, else the newest complete one (compact_dist.
    training.resume); keep_last: complete checkpoints kept (older ones deleted by step)."""

    dir: Optional[str] = Field(None, description="checkpoint directory (null: no "
                               "checkpoints); checked writable before step 1")
    save_interval: int = Field(0, ge=0, description="steps between saves (0: only at the "
                               "end and on SIGTERM / SIGUSR1 / Ctrl-C)")
    resume: bool = Field(True, description="continue from the checkpoint in dir, if any")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept (older deleted)")
    load_step: Optional[int] = Field(None, ge=1, description="resume exactly this step "
                                     "(error if absent)")

    @model_validator(mode="after")
    def _load_step_needs_resume(self) -> "CheckpointConfig":
        if self.load_step is not None and not (self.dir and self.resume):
            raise ValueError("checkpoint.load_step needs checkpoint.dir and "
                             "checkpoint.resume=true")
        return self


class LoggingConfig(_Section):
    """kept_energy: measure what the projection P keeps of every compact layer's weight
    gradient on a probe micro-batch right before each resample (compact_dist.core.kept_energy;
    the progress line, TensorBoard quality/kept_energy/<layer> and the summary show it).
    kept_energy_warn_below: a warning line when the mean over the layers falls below it (not
    at the first measurement). 0.5: healthy runs of the pca default keep more from their
    second measurement on, some not much more: the embedded default job printed 0.545 at its
    step 400 (validation perplexity 30.9; README's quick start on CPU, stop 33), the 110M pca
    runs at lr 1e-3 to 4e-3 0.61-0.69 at step 400 and 0.70-0.84 later
    (benchmarks/results/convergence110m_offload.md, convergence110m_lr2.md), ending at or below
    the baseline; a Gaussian P keeps about the ratio (0.25 at r = n/4)."""

    tensorboard_dir: Optional[str] = Field(None, description="write TensorBoard scalars "
                                           "here (the progress line's, validation, kept "
                                           "energy)")
    wandb_project: Optional[str] = Field(None, description="also log the scalars to this "
                                         "Weights & Biases project (needs wandb installed)")
    progress: bool = Field(True, description="tqdm bar on a terminal (log files get the "
                           "lines only)")
    peak_tflops: Optional[float] = Field(None, gt=0, description="peak dense TFLOP/s of one "
                                         "GPU for MFU; null: the table of known GPUs "
                                         "(compact_dist/training/progress.py)")
    kept_energy: bool = Field(True, description="measure what P keeps of the weight "
                              "gradients before each resample")
    kept_energy_warn_below: float = Field(0.5, ge=0, le=1, description="warn when the mean "
                                          "kept energy falls below this (not at the first "
                                          "measurement)")


class TrainConfig(_Section):
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    recompute: RecomputeConfig = RecomputeConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    compression: CompressionConfig = CompressionConfig()
    activations: ActivationConfig = ActivationConfig()

    @model_validator(mode="after")
    def _combinations(self) -> "TrainConfig":
        m, p = self.model, self.parallel
        tp = p.tensor_model_parallel_size
        if m.hidden_size % m.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={m.hidden_size} is not divisible by "
                f"model.num_attention_heads={m.num_attention_heads}"
            )
        groups = m.num_query_groups or m.num_attention_heads
        if m.num_attention_heads % groups:
            raise ValueError(f"model.num_attention_heads={m.num_attention_heads} is not "
                             f"divisible by model.num_query_groups={groups}")
        for name, value in (("num_attention_heads", m.num_attention_heads),
                            ("num_query_groups", groups), ("ffn_hidden_size", m.ffn)):
            if value % tp:
                raise ValueError(
                    f"parallel.tensor_model_parallel_size={tp} does not divide {name}={value}"
                )
        if p.sequence_parallel:
            if tp == 1:
                raise ValueError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
            if m.seq_length % tp:
                raise ValueError(f"model.seq_length={m.seq_length} is not divisible by TP size "
                                 f"{tp} (parallel.sequence_parallel=true)")
        if self.recompute.deepspeed_checkpointing and self.recompute.granularity == "none":
            raise ValueError("recompute.deepspeed_checkpointing=true needs "
                             "recompute.granularity full or selective")
        c = self.compression
        if c.enabled and c.kind.needs_probe:
            # the probe backward must not accumulate .grad: recompute's backward (Megatron's
            # and DeepSpeed's checkpoint) calls torch.autograd.backward inside, and DeepSpeed's
            # ZeRO-3 gathers partitioned parameters only through the engine's hooks (FSDP2's
            # fully_shard gathers in module hooks, which the probe runs through)
            if self.recompute.granularity != "none":
                raise ValueError("compression.projection=gradient does not support activation "
                                 "recompute (use projection=pca)")
            if self.train.zero_stage == 3 and self.train.engine == "deepspeed":
                raise ValueError("compression.projection=gradient does not support ZeRO-3 "
                                 "(use projection=pca)")
        self._check_engine()
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr={self.optim.min_lr} must not exceed "
                             f"optim.lr={self.optim.lr}")
        self.compression.check_parallel(tp)
        self._check_ranks()
        self.activations.check_model(m.attention_dropout, self.recompute.granularity)
        if self.train.offload_optimizer != "none" and self.train.zero_stage == 0:
            raise ValueError(f"train.offload_optimizer={self.train.offload_optimizer} needs "
                             "train.zero_stage 1, 2 or 3 (DeepSpeed offloads ZeRO's "
                             "partitions)")
        return self

    def _check_engine(self) -> None:
        """What train.engine=fsdp2 cannot mean: a ZeRO stage that does not shard parameters,
        DeepSpeed's recompute, sequence parallelism (its TP gradient hooks sit on the
        parameters FSDP2 replaces), the bf16 pair's low word (a buffer FSDP2 does not shard)
        and bf16 (no mixed-precision policy is wired)."""
        t = self.train
        if t.engine != "fsdp2":
            return
        if t.zero_stage not in (2, 3):
            raise ValueError(f"train.engine=fsdp2 shards parameters, gradients and optimizer "
                             f"state: train.zero_stage={t.zero_stage} has no meaning there; "
                             "set 3 (reshard after forward) or 2 (keep until backward)")
        if self.recompute.deepspeed_checkpointing:
            raise ValueError("recompute.deepspeed_checkpointing needs train.engine=deepspeed")
        if self.parallel.sequence_parallel:
            raise ValueError("train.engine=fsdp2 does not support parallel.sequence_parallel")
        if self.compression.enabled and self.compression.base_dtype == "bf16_pair":
            raise ValueError("train.engine=fsdp2 does not shard the low word of a bf16-pair W0 "
                             "(a buffer): set compression.base_dtype fp32 or bf16")
        if t.precision == "bf16":
            raise ValueError("train.engine=fsdp2 trains in fp32: set train.precision=fp32 "
                             "(bf16 mixed precision is not wired for FSDP2)")
        if t.offload_optimizer != "none":
            raise ValueError("train.offload_optimizer is DeepSpeed's ZeRO-Offload: it needs "
                             "train.engine=deepspeed")

    def _check_ranks(self) -> None:
        """Each compressed linear's projection rank for the model's shapes (what
        LayerCompression.rank_for computes when the layer is built)."""
        c = self.compression
        for role, (key, in_features, _) in self.model.linear_shapes().items():
            setting = c.for_role(role)
            if setting is None:
                continue
            blocks = c.row_parallel_blocks if role in ROW_ROLES else 1
            try:
                setting.rank_for(in_features, blocks)
            except ValueError as err:
                raise ValueError(f"linear_{role} (input {key}={in_features}): {err}") from None

    def check_environment(self, world_size: int, has_cuda: bool) -> None:
        """Checks that need the world size, the device and the filesystem (data paths), still
        before any process group."""
        self.check_launch(world_size, has_cuda)
        self.data.check(self.model.seq_length)
        if self.logging.wandb_project:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ValueError("logging.wandb_project is set but wandb is not installed "
                                 "(pip install wandb, or unset it: TensorBoard needs nothing "
                                 "extra)")

    def check_launch(self, world_size: int, has_cuda: bool) -> None:
        """What the world size and the device allow; no filesystem access (compact-plan runs
        it for every candidate)."""
        tp = self.parallel.tensor_model_parallel_size
        if world_size % tp:
            raise ValueError(f"world size {world_size} is not divisible by TP size {tp} "
                             "(parallel.tensor_model_parallel_size)")
        dp = world_size // tp
        per_step = self.train.micro_batch_size * dp
        gbs = self.train.global_batch_size or per_step
        if gbs % per_step:
            raise ValueError(
                f"train.global_batch_size={gbs} is not a multiple of micro_batch_size x "
                f"data-parallel size = {self.train.micro_batch_size} x {dp}"
            )
        if self.parallel.sequence_parallel and not has_cuda:
            raise ValueError(
                "parallel.sequence_parallel needs CUDA: megatron-core 0.16.1's sequence-parallel "
                "embedding and output gathers allocate on torch.cuda.current_device()"
            )
        bf16 = self.train.precision == "bf16" or (self.train.precision == "auto" and has_cuda)
        c = self.compression
        zero3_subspace = self.train.zero_stage == 3 and c.enabled and c.mode == "subspace"
        if zero3_subspace and c.base_dtype == "bf16_pair":
            raise ValueError(
                "train.zero_stage=3 does not partition the low word of a bf16-pair W0 (a "
                "buffer): set compression.base_dtype=bf16 (stochastic-rounding merges), or use "
                "ZeRO-1/2")
        if zero3_subspace and bf16 and c.base_dtype == "fp32":
            raise ValueError(
                "train.zero_stage=3 with bf16 partitions the frozen W0 in bf16: set "
                "compression.base_dtype=bf16 (stochastic-rounding merges), or use ZeRO-1/2 to "
                "keep an fp32 W0")
        if self.train.engine == "fsdp2" and bf16:
            raise ValueError("train.engine=fsdp2 trains in fp32: set train.precision=fp32 "
                             "(auto means bf16 with CUDA; bf16 mixed precision is not wired "
                             "for FSDP2)")
        if self.train.precision == "bf16" and not has_cuda:
            raise ValueError("train.precision=bf16 needs CUDA; use fp32 (or auto) on CPU")

    def gradient_accumulation_steps(self, data_parallel_size: int) -> int:
        per_step = self.train.micro_batch_size * data_parallel_size
        return (self.train.global_batch_size or per_step) // per_step


def _set_override(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(yaml_error_line(err, f"override {dotted}={raw}", lines=False)) from None


def load_train_config(path: Optional[str], overrides: list[str] = ()) -> TrainConfig:
    """YAML (or the embedded default when path is None) plus `a.b=value` overrides; every
    error one ValueError line naming the key (and the file and line of a YAML error)."""
    tree: dict = read_yaml_mapping(path) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        _set_override(tree, key.strip(), raw)
    return validate(TrainConfig, tree)


def world_from_environment() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun / the deepspeed launcher / srun.

    Slurm's batch script itself (sbatch without srun) has SLURM_PROCID=0 and the job's
    SLURM_NTASKS but no SLURM_STEP_ID (srun sets it in every task): with SLURM_NTASKS > 1 it
    is one process of a world that never starts, so this raises instead of letting rank 0
    wait for the others forever."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        ntasks = int(env["SLURM_NTASKS"])
        if ntasks > 1 and "SLURM_STEP_ID" not in env:
            raise ValueError(
                f"SLURM_NTASKS={ntasks} but this is Slurm's batch script, not one of "
                f"{ntasks} srun tasks (no SLURM_STEP_ID): start one process per task with "
                "srun (launch/slurm/pretrain.sbatch does), or torchrun")
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), ntasks
    return 0, 0, 1
