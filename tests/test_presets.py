"""configs/train/*.yaml: every preset loads and validates (with world sizes its TP size and
batch sizes divide), the LLaMA presets have the parameter counts their names say (counted
from the config, the formula checked against a built Megatron model), they cover ZeRO-1/2/3
and several compression ratios, and default.yaml is the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compact_dist.training.train_config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
LLAMA = {  # preset -> (named size, GPU world sizes it is meant for)
    "llama_60m": (60e6, [1, 8]),
    "llama_350m": (350e6, [8, 16]),
    "llama_1_3b": (1.3e9, [8, 16, 32]),
    "llama_7b": (7e9, [16, 32, 64]),
}


def padded_vocab(cfg: TrainConfig) -> int:
    """The tokenizer's vocabulary padded as training.model_setup.padded_vocab_size (multiple of 64 x TP)."""
    vocab = 257 if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
    step = 64 * cfg.parallel.tensor_model_parallel_size
    return -(-vocab // step) * step


def parameter_count(cfg: TrainConfig) -> int:
    """Parameters of the LLaMA-style GPT of `cfg` (what W_eff holds; CompAct's factors A are
    extra trainable state of the same layers): untied input embedding and output layer,
    per layer RMSNorm x2, QKV (grouped KV heads), output projection, SwiGLU FC1 (2 x ffn) and
    FC2, final RMSNorm; no biases."""
    m = cfg.model
    h, ffn = m.hidden_size, m.ffn
    kv = h // m.num_attention_heads * (m.num_query_groups or m.num_attention_heads)
    layer = 2 * h + h * (h + 2 * kv) + h * h + h * 2 * ffn + ffn * h
    embeddings = 2 * padded_vocab(cfg) * h  # rotary positions: no position parameters
    return embeddings + m.num_layers * layer + h


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert set(LLAMA) | {"default", "tiny"} <= names, names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(path):
    cfg = load_train_config(str(path))
    tp = cfg.parallel.tensor_model_parallel_size
    worlds = LLAMA.get(path.stem, (None, [1, 2, 4]))[1]
    for world in worlds:
        assert world % tp == 0
        cfg.check_environment(world_size=world, has_cuda=True)
    # a world size the TP size does not divide is refused
    if tp > 1:
        with pytest.raises(ValueError, match="not divisible by TP size"):
            cfg.check_environment(world_size=tp + 1, has_cuda=True)
    # the global batch is kept whatever the data-parallel size: accumulation makes up the rest
    if cfg.train.global_batch_size:
        dp = worlds[-1] // tp
        assert cfg.gradient_accumulation_steps(dp) * cfg.train.micro_batch_size * dp \
            == cfg.train.global_batch_size


@pytest.mark.parametrize("name", ["default", "tiny", "llama_60m"])
def test_small_presets_also_validate_on_cpu(name):
    load_train_config(str(ROOT / "configs" / "train" / f"{name}.yaml")).check_environment(
        world_size=2, has_cuda=False)


@pytest.mark.parametrize("name", sorted(LLAMA))
def test_llama_presets_have_their_named_size(name):
    cfg = load_train_config(str(ROOT / "configs" / "train" / f"{name}.yaml"))
    size = LLAMA[name][0]
    count = parameter_count(cfg)
    assert 0.9 * size <= count <= 1.1 * size, f"{name}: {count / 1e6:.1f}M parameters"
    m = cfg.model
    assert m.hidden_size % m.num_attention_heads == 0 and m.ffn % 256 == 0  # LLaMA shapes
    assert cfg.data.vocab_size == 32000
    assert cfg.compression.enabled and cfg.compression.mode == "subspace"


def test_presets_cover_zero_stages_and_ratios():
    cfgs = [load_train_config(str(ROOT / "configs" / "train" / f"{n}.yaml")) for n in LLAMA]
    assert {c.train.zero_stage for c in cfgs} == {1, 2, 3}
    assert {c.compression.ratio for c in cfgs} >= {0.25, 0.125}
    sizes = [parameter_count(c) for c in cfgs]
    assert sizes == sorted(sizes)


def test_zero_stage_and_ratio_switch_by_override():
    path = str(ROOT / "configs" / "train" / "llama_7b.yaml")
    cfg = load_train_config(path, ["train.zero_stage=2", "compression.ratio=0.25",
                                   "parallel.sequence_parallel=true"])
    assert (cfg.train.zero_stage, cfg.compression.ratio) == (2, 0.25)
    cfg.check_environment(world_size=16, has_cuda=True)
    zero3_sp = load_train_config(path, ["parallel.sequence_parallel=true"])  # preset's ZeRO-3
    assert (zero3_sp.train.zero_stage, zero3_sp.parallel.tensor_model_parallel_size) == (3, 2)
    zero3_sp.check_environment(world_size=16, has_cuda=True)
    with pytest.raises(ValueError, match="sequence_parallel needs CUDA"):
        zero3_sp.check_environment(world_size=16, has_cuda=False)
    with pytest.raises(ValueError, match="does not divide"):
        load_train_config(path, ["parallel.tensor_model_parallel_size=3"])


def test_default_yaml_is_the_embedded_default():
    written = load_train_config(str(ROOT / "configs" / "train" / "default.yaml"))
    assert written.model_dump() == load_train_config(None).model_dump()


@pytest.mark.parametrize("name", ["tiny", "default", "llama_60m"])
def test_parameter_formula_matches_the_built_model(name, megatron_tp1):
    """The count above is exact for the model compact-train builds (rotary positions, no
    position parameters, on every device; Megatron baseline, whose weights are what W0 / W_eff
    hold in the CompAct model); compact-train's start-up count agrees and adds A."""
    from compact_dist.megatron.model import build_gpt_model
    from compact_dist.training.startup import parameter_counts
    from compact_dist.training.model_setup import transformer_config

    cfg = load_train_config(str(ROOT / "configs" / "train" / f"{name}.yaml"),
                            ["compression.enabled=false"])
    assert cfg.model.position_embedding == "rope"
    model = build_gpt_model(transformer_config(cfg, bf16=False), cfg.compression,
                            padded_vocab(cfg), cfg.model.seq_length,
                            cfg.model.position_embedding)
    built = sum(p.numel() for p in model.parameters())
    assert built == parameter_count(cfg)
    del model

    compact = load_train_config(str(ROOT / "configs" / "train" / f"{name}.yaml"))
    model = build_gpt_model(transformer_config(compact, bf16=False), compact.compression,
                            padded_vocab(compact), compact.model.seq_length,
                            compact.model.position_embedding)
    frozen_or_dense = sum(p.numel() for n, p in model.named_parameters()
                          if "subspace_factor" not in n)
    assert frozen_or_dense == built  # W0 has the baseline's shapes; A comes on top
    counts = parameter_counts(model, tensor_model_parallel_size=1)
    assert counts["total"] - counts["factors"] == built
    assert counts["frozen"] == sum(p.numel() for n, p in model.named_parameters()
                                   if n.endswith("linear_qkv.weight") or n.endswith(
                                       "linear_proj.weight") or n.endswith("linear_fc1.weight")
                                   or n.endswith("linear_fc2.weight"))
    assert counts["trainable"] == counts["total"] - counts["frozen"]


def test_cli_prints_a_preset():
    proc = subprocess.run(
        [sys.executable, "-m", "compact_dist.training.train", "--config", "configs/train/llama_1_3b.yaml",
         "--print-config", "train.zero_stage=3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["model"]["hidden_size"] == 2048 and printed["train"]["zero_stage"] == 3
