"""Megatron-LM's own training loop (its `pretrain_gpt.py`) as a client of compact_dist.

    COMPACT_DIST_CONFIG=my_run.yaml torchrun --nproc-per-node 8 \\
        -m compact_dist.megatron.megatron_lm pretrain_gpt.py \\
        --spec compact_dist.megatron.megatron_lm compact_gpt_layer_spec \\
        --transformer-impl local ... (the run's Megatron-LM arguments)

or, instead of `-m compact_dist.megatron.megatron_lm`, the one line
`import compact_dist.megatron.megatron_lm as compact; compact.install()` in pretrain_gpt.py
before its `pretrain(...)` call.

Two pieces, matching Megatron-LM at the release of megatron-core 0.16.1 (tag core_v0.16.1):
- `compact_gpt_layer_spec`: a ModuleSpec object. `--spec MODULE NAME` hands the named object
  to GPTModel as it is, never calling it (megatron/core/transformer/spec_utils.py
  import_module), so the spec is built when this module is imported, from the `compression`
  and `activations` sections of the compact-train YAML that COMPACT_DIST_CONFIG names (unset:
  the defaults, pca r = n/4). Every norm is compact_dist's SequenceParallelTorchNorm (LayerNorm
  or RMSNorm per --normalization; apex's fused norm is not used): the two of each layer from
  the spec, the final one because install() points megatron-core's LayerNormImpl at it
  (Megatron builds the final norm from LayerNormImpl, whose torch fallback refuses sequence
  parallelism). Only `activations.fp8_storage` applies on this path.
- `install()`: the merge after every optimizer step. Megatron-LM has no post-step hook; its
  train() calls the module global megatron.training.training.train_step every iteration, so
  install() wraps it: after a step that updated the parameters (skipped_iter == 0) the
  SubspaceStepper of each model chunk merges A into W0 (and re-estimates P when due), with
  the learning rate and weight decay of A's param group for that step. It also registers
  MegatronLMBackend, through which the merge reads and writes A's master copy and Adam
  moments in Megatron's optimizer.

What the backend supports: Adam / AdamW in FP32Optimizer (no --bf16: the optimizer steps A
itself) and in Float16OptimizerWithFloat16Params (--bf16: A's fp32 master is `A.main_param`),
inside Megatron's ChainedOptimizer. Refused at the first training step with one error:
--use-distributed-optimizer (A's master is a flat shard of this rank), --fp16 (the sketch of
P overflows fp16), other optimizers (A's Adam moments are transported), model options the
spec object does not build (--qk-layernorm, MoE, multi-latent attention, context
parallelism), A's in param groups of different lr / weight decay, resuming from a checkpoint
(the projection bases and the stepper's step count are not in Megatron-LM's checkpoint
yet), compression.projection=gradient (needs a probe before each step) and
moments_on_resample=reset. Megatron builds its own param groups, in which A is decayed like
any matrix: A is zero after every merge, so AdamW's decay of A only touches the residual
the bf16 rounding left in its master; W0 is decayed by the merge with the group's rate.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from compact_dist.core.backend import MasterSlice
from compact_dist.core.torch_backend import TorchBackend
from compact_dist.core.config import CompressionConfig
from compact_dist.megatron.activations import ActivationConfig

CONFIG_ENV = "COMPACT_DIST_CONFIG"


def settings_from_environment() -> tuple[CompressionConfig, ActivationConfig]:
    """The `compression` and `activations` sections of the YAML that COMPACT_DIST_CONFIG
    names (other sections ignored), validated; unset: the defaults."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return CompressionConfig(), ActivationConfig()
    import yaml

    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{CONFIG_ENV}={path}: {err}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{CONFIG_ENV}={path}: not a mapping of sections")
    activations = ActivationConfig.model_validate(tree.get("activations") or {})
    ignored = sorted(activations.model_fields_set - {"fp8_storage"})
    if ignored:
        raise ValueError(f"{CONFIG_ENV}={path}: activations.{ignored[0]} has no effect with "
                         "Megatron-LM's loop (only activations.fp8_storage applies)")
    return CompressionConfig.model_validate(tree.get("compression") or {}), activations


def build_layer_spec(compression: CompressionConfig, activations: ActivationConfig):
    """compact_dist's GPT layer spec with SequenceParallelTorchNorm for both norms."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from compact_dist.megatron.norm import SequenceParallelTorchNorm
    from compact_dist.megatron.spec import get_compact_gpt_layer_spec

    spec = get_compact_gpt_layer_spec(compression, activations=activations)
    fp8_norm = "norm" in activations.fp8_storage
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        setattr(spec.submodules, name, ModuleSpec(
            module=SequenceParallelTorchNorm, params={"fp8_storage": True})
            if fp8_norm else SequenceParallelTorchNorm)
    return spec


COMPRESSION, ACTIVATIONS = settings_from_environment()
compact_gpt_layer_spec = build_layer_spec(COMPRESSION, ACTIVATIONS)


# ------------------------------------------------------------------------------- the backend
class MegatronLMBackend(TorchBackend):
    """A's master and moments in megatron-core's optimizers (FP32Optimizer,
    Float16OptimizerWithFloat16Params, in a ChainedOptimizer). A is whole on every
    data-parallel rank (no distributed optimizer), W0 is whole, the merge needs no
    communication: as the torch backend, except where A's master and state live. The
    factors are those of the models install() merges (`track`)."""

    name = "megatron-lm"

    def __init__(self) -> None:
        self.factors: list[torch.Tensor] = []

    def track(self, factors: Sequence[torch.Tensor]) -> None:
        known = {id(f) for f in self.factors}
        self.factors += [f for f in factors if id(f) not in known]

    def claims(self, optimizer, factors: Sequence[torch.Tensor]) -> bool:
        from megatron.core.optimizer.optimizer import MegatronOptimizer

        return isinstance(optimizer, MegatronOptimizer)

    @staticmethod
    def _inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
        for part in parts:
            if isinstance(part, DistributedOptimizer):
                raise ValueError("compact_dist with Megatron-LM: --use-distributed-optimizer "
                                 "is not supported yet (A's master is a flat shard there); "
                                 "run without it")
        return [part.optimizer for part in parts if part.optimizer is not None]

    def stepped(self, optimizer, factor: torch.Tensor):
        """(the torch optimizer, A's param group, the tensor it steps for A: A.main_param
        under mixed precision, else A)."""
        main = getattr(factor, "main_param", None)
        target = factor if main is None else main
        if main is not None and main.shape != factor.shape:
            raise ValueError(f"A {tuple(factor.shape)}: its master {tuple(main.shape)} is not "
                             "a whole copy (a distributed optimizer's shard?)")
        for inner in self._inner_optimizers(optimizer):
            for group in inner.param_groups:
                if any(p is target for p in group["params"]):
                    return inner, group, target
        raise ValueError(f"{type(optimizer).__name__} steps neither the subspace factor A "
                         f"{tuple(factor.shape)} nor its main_param")

    def master_slices(self, optimizer,
                      factors: Sequence[torch.Tensor]) -> list[Optional[MasterSlice]]:
        out = []
        for factor in factors:
            _, _, target = self.stepped(optimizer, factor)
            out.append(None if target is factor
                       else MasterSlice(target.view(-1), 0, factor.numel()))
        return out

    def inner_optimizer(self, optimizer) -> torch.optim.Optimizer:
        inners = self._inner_optimizers(optimizer)
        if len(inners) != 1:
            raise ValueError(f"{len(inners)} torch optimizers in {type(optimizer).__name__}: "
                             "name the one of a factor (stepped)")
        return inners[0]

    def factor_states(self, optimizer):
        if not self.factors:
            raise RuntimeError("MegatronLMBackend: no subspace factors tracked (install() "
                               "tracks them at the first training step)")
        for factor in self.factors:
            inner, _, target = self.stepped(optimizer, factor)
            yield inner.state.get(target) or None

    def read_moment(self, optimizer, factor: torch.Tensor, key: str) -> Optional[torch.Tensor]:
        inner, _, target = self.stepped(optimizer, factor)
        return inner.state.get(target, {}).get(key)


MEGATRON_LM_BACKEND = MegatronLMBackend()


# ------------------------------------------------------------------------------ the merge
def _unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    """The module under Megatron's DDP / Float16Module wrappers (their `.module`)."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


class MegatronLMMerge:
    """The SubspaceSteppers of a Megatron-LM model (one per model chunk) and what they need
    from the training step."""

    def __init__(self, model: Sequence[torch.nn.Module], compression: CompressionConfig,
                 iteration: Optional[int]) -> None:
        from compact_dist.core.subspace import SubspaceStepper, compact_layers

        if compression.kind.needs_probe:
            raise ValueError("compact_dist with Megatron-LM: compression.projection="
                             f"{compression.projection!r} needs a probe before each step; "
                             "use pca or gaussian")
        if compression.moments_on_resample == "reset":
            raise ValueError("compact_dist with Megatron-LM: moments_on_resample=reset is not "
                             "supported; use transport or keep")
        if iteration:
            raise ValueError(f"compact_dist with Megatron-LM: the run starts at iteration "
                             f"{iteration} (a resumed checkpoint); resuming is not supported "
                             "yet (the projection bases are not in Megatron-LM's checkpoint)")
        chunks = [(m, compact_layers(m)) for m in map(_unwrapped, model)]
        self.layers = [layer for _, layers in chunks for layer in layers]
        if not self.layers:
            raise ValueError("compact_dist with Megatron-LM: the model has no compact layer "
                             "(pass --spec compact_dist.megatron.megatron_lm "
                             "compact_gpt_layer_spec)")
        self.steppers = [SubspaceStepper(m, compression) for m, layers in chunks if layers]
        MEGATRON_LM_BACKEND.track([layer.subspace_factor for layer in self.layers])

    def check(self, config, optimizer) -> None:
        """Refuse what this path does not support (module docstring), once, at the first
        step: config is Megatron's TransformerConfig of the model."""
        unsupported = {"qk_layernorm": "--qk-layernorm", "num_moe_experts": "MoE",
                       "multi_latent_attention": "--multi-latent-attention",
                       "fp16": "--fp16 (the sketch of P overflows fp16; use --bf16)"}
        for attr, what in unsupported.items():
            if getattr(config, attr, None):
                raise ValueError(f"compact_dist with Megatron-LM: {what} is not supported")
        if (getattr(config, "context_parallel_size", 1) or 1) > 1:
            raise ValueError("compact_dist with Megatron-LM: context parallelism is not supported")
        for layer in self.layers:
            inner, _, _ = MEGATRON_LM_BACKEND.stepped(optimizer, layer.subspace_factor)
            if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                raise ValueError(f"compact_dist with Megatron-LM: {type(inner).__name__} steps "
                                 "A; only Adam / AdamW (A's moments are transported at each "
                                 "new P)")
        self.step_hyperparameters(optimizer)

    def step_hyperparameters(self, optimizer) -> tuple[float, float]:
        """(lr, weight decay) of the A's param group now, before the step (Megatron's
        scheduler sets the next step's after it): W0's decay rate. Raises when A's sit in
        groups of different lr or weight decay."""
        values = set()
        for layer in self.layers:
            _, group, _ = MEGATRON_LM_BACKEND.stepped(optimizer, layer.subspace_factor)
            values.add((float(group["lr"]), float(group["weight_decay"])))
        if len(values) != 1:
            raise ValueError(f"compact_dist with Megatron-LM: the subspace factors A sit in param "
                             f"groups of different (lr, weight decay): {sorted(values)}")
        return values.pop()

    def after_step(self, lr: float, weight_decay: float, optimizer) -> None:
        for stepper in self.steppers:
            stepper.after_step(lr, weight_decay, optimizer)


_MERGE: Optional[MegatronLMMerge] = None


def install(compression: Optional[CompressionConfig] = None) -> None:
    """Wrap megatron.training.training.train_step with the merge after each step that
    updated the parameters, register MegatronLMBackend and build the final norm as
    compact_dist's (megatron-core's LayerNormImpl). Call before the model is built.
    compression: the settings the spec was built with (default: this module's, from
    COMPACT_DIST_CONFIG). Idempotent."""
    import megatron.core.transformer.transformer_block as transformer_block
    import megatron.training.training as training

    from compact_dist.core.backend_registry import register_backend
    from compact_dist.megatron.norm import SequenceParallelTorchNorm

    register_backend(MEGATRON_LM_BACKEND)
    use_packaged_dataset_helpers()
    # the final norm: Megatron builds it from LayerNormImpl when --spec names a layer spec
    transformer_block.LayerNormImpl = SequenceParallelTorchNorm
    if getattr(training.train_step, "compact_dist_merge", False):
        return
    settings = compression or COMPRESSION
    original = training.train_step

    def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler,
                   config, forward_backward_func, *args, **kwargs):
        global _MERGE
        if _MERGE is None:
            merge = MegatronLMMerge(model, settings, kwargs.get("iteration",
                                                                args[0] if args else None))
            merge.check(config, optimizer)
            _MERGE = merge
        lr, weight_decay = _MERGE.step_hyperparameters(optimizer)
        out = original(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler,
                       config, forward_backward_func, *args, **kwargs)
        if not out[1]:  # skipped_iter: no update, nothing to merge
            _MERGE.after_step(lr, weight_decay, optimizer)
        return out

    train_step.compact_dist_merge = True
    training.train_step = train_step


def use_packaged_dataset_helpers() -> None:
    """Megatron-LM's initialize runs megatron-core's `compile_helpers()` (`make` in
    megatron/core/datasets). The megatron-core wheel ships those helpers compiled
    (`helpers_cpp`) but no Makefile, so with a pip-installed megatron-core the make fails and
    Megatron-LM exits. Where the Makefile is absent, compile_helpers becomes an import of the
    packaged module (ImportError if the wheel has none); a source checkout keeps Megatron's."""
    import megatron.core.datasets.utils as dataset_utils

    if (Path(dataset_utils.__file__).parent / "Makefile").exists():
        return

    def compile_helpers() -> None:
        from megatron.core.datasets import helpers_cpp  # noqa: F401

    dataset_utils.compile_helpers = compile_helpers


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m compact_dist.megatron.megatron_lm SCRIPT [ARGS]`: install(), then run
    SCRIPT (e.g. Megatron-LM's pretrain_gpt.py) as __main__ with ARGS."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        sys.exit("usage: python -m compact_dist.megatron.megatron_lm pretrain_gpt.py "
                 "[Megatron-LM arguments]")
    import importlib

    script = os.path.abspath(argv[0])
    sys.path.insert(0, os.path.dirname(script))  # as `python pretrain_gpt.py` would
    # the module --spec imports, not this __main__ copy of it: one backend, one merge
    importlib.import_module("compact_dist.megatron.megatron_lm").install()
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
