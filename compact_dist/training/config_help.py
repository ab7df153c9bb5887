"""`compact-train --help-config`: every key of the typed run config (TrainConfig) with its
type, its default (the resolved embedded default job, configs/train/default.yaml) and a
one-line meaning.

Keys, types and defaults come from the pydantic models. The meaning is the field's
`description` (the sections defined in compact_dist.training.train_config) or, for the
sections whose models live elsewhere (data, compression, activations), the line in
`MEANINGS`; tests/test_config.py checks that every key has one, so a new key without a
meaning fails there.
"""

from __future__ import annotations

import json
import typing
from typing import Any

MEANINGS = {
    "data.source": "stdlib (the interpreter's standard library, for demos), files (text / "
                   "jsonl globs) or indexed (Megatron .bin/.idx prefixes)",
    "data.paths": "files: globs or directories; indexed: prefixes or [weight, prefix, ...] "
                  "blends (Megatron-LM's --data-path)",
    "data.valid_paths": "indexed: a separate validation blend (instead of split)",
    "data.split": "indexed: train,valid,test weights; null: 98,2,0",
    "data.jsonl_key": "the text field of .jsonl records",
    "data.tokenizer": "bpe (trained on the corpus), byte, or a tokenizer.json / HF directory / "
                      "SentencePiece .model",
    "data.eod_token": "end-of-document token's text (path tokenizers); null: the tokenizer's",
    "data.vocab_size": "vocabulary of the trained BPE tokenizer",
    "data.max_bytes": "stdlib / files: read at most this many bytes of text",
    "data.tokenizer_train_bytes": "BPE training sample budget; null: all the text",
    "data.valid_fraction": "stdlib / files: share of documents held out for validation",
    "data.cache_dir": "tokenized dataset and index caches (a directory every node sees)",
    "data.seed": "document split and shuffling seed",
    "compression.enabled": "false: Megatron's own linears (the baseline)",
    "compression.mode": "subspace (frozen W0 + trainable A, the paper's rule) or unbiased "
                        "(trainable W, gradient G P P^T)",
    "compression.ratio": "projection rank r as a fraction of each linear's input width",
    "compression.rank": "absolute projection rank r (instead of ratio)",
    "compression.ratios": "per-role ratio overrides, e.g. {fc1: 0.5}",
    "compression.seed": "seed of the Gaussian projections",
    "compression.resample_interval": "T: a new projection P every T optimizer steps",
    "compression.base_dtype": "storage of the frozen W0: fp32, bf16 (stochastic-rounding "
                              "merges) or bf16_pair (two bf16 words)",
    "compression.row_parallel_blocks": "diagonal blocks of P in row-parallel linears "
                                       "(divisible by TP)",
    "compression.layers": "which of the four linears per layer are compressed",
    "compression.moments_on_resample": "Adam moments of A when P changes: keep, reset or "
                                       "transport into the new basis",
    "compression.projection": "P: pca (input's principal directions), gradient (GaLore-style) "
                              "or gaussian (the paper's)",
    "compression.update_scale": "alpha in W_eff = W0 + alpha A P^T",
    "compression.exact_input": "roles whose linear saves its input X instead of Z = X P "
                               "(same gradients)",
    "activations.fused_swiglu": "Megatron's fused SwiGLU + bias-dropout-add; null: on with "
                                "CUDA, off on CPU",
    "activations.fused_cross_entropy": "output layer + cross-entropy over token chunks, no "
                                       "full logits (exact)",
    "activations.cross_entropy_chunk_tokens": "tokens per chunk of the fused loss",
    "activations.fp8_storage": "any of swiglu, attention, norm: saved for backward in FP8 "
                               "e4m3 (lossy)",
}


def type_name(annotation: Any) -> str:
    """'int', 'int or null', 'rope | learned_absolute', 'list of qkv | proj | ...'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        named = " or ".join(type_name(a) for a in rest)
        return f"{named} or null" if len(rest) < len(args) else named
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"map {type_name(args[0])} -> {type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_keys() -> list[dict[str, str]]:
    """One row per key of TrainConfig: {"key", "type", "default", "meaning"} (meaning empty
    where neither a description nor MEANINGS has one)."""
    from compact_dist.training.train_config import TrainConfig

    defaults = TrainConfig().model_dump(mode="json")
    rows = []
    for section, info in TrainConfig.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            key = f"{section}.{name}"
            rows.append({"key": key, "type": type_name(field.annotation),
                         "default": _shown(defaults[section][name]),
                         "meaning": field.description or MEANINGS.get(key, "")})
    return rows


def help_config() -> str:
    rows = config_keys()
    width = max(len(r["key"]) for r in rows) + 2
    lines = ["compact-train configuration keys (YAML sections, or section.key=value on the "
             "command line; defaults: the embedded default job, configs/train/default.yaml):"]
    section = None
    for r in rows:
        if r["key"].split(".")[0] != section:
            section = r["key"].split(".")[0]
            lines.append(f"\n{section}:")
        lines.append(f"  {r['key']:<{width}}{r['type']}, default {r['default']}")
        lines.append(f"  {'':<{width}}{r['meaning']}")
    return "\n".join(lines)
