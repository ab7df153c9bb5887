"""The run's description in a checkpoint tag directory: compact_run.json (the resolved
TrainConfig and the model facts Megatron chose: position embedding, rotary base and percent,
norm epsilon, padded vocabulary, maximum sequence length, tied embeddings; the tokenizer's
kind, size and end-of-document id) and the tokenizer itself (tokenizer.json for BPE and
tokenizer.json path tokenizers, or a SentencePiece .model copied as tokenizer.model).

compact-train writes them (rank 0, through compact_dist.training.checkpoint.save_checkpoint's
`write_run_files`, before `latest` moves); resume (compact_dist/training/resume.py) compares
the saved config with the new one; compact-export (compact_dist/tools/export.py) rebuilds the
model's shapes and tokenizer from them without building the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

RUN_FILE = "compact_run.json"
TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"  # a data.tokenizer .model, copied as is
RUN_FORMAT = 1


def write_run_files(directory: Path, cfg, tokenizer, model: torch.nn.Module) -> None:
    """compact_run.json (+ tokenizer.json for BPE and tokenizer.json path tokenizers, or the
    SentencePiece .model as tokenizer.model) in a checkpoint tag directory (rank 0, from
    compact_dist.training.checkpoint.save_checkpoint). `model`: the Megatron GPTModel being
    trained."""
    directory = Path(directory)
    run = {
        "format": RUN_FORMAT,
        "config": cfg.model_dump(mode="json"),
        "model": {
            "position_embedding": model.position_embedding_type,
            "rotary_base": getattr(model, "rotary_base", None),
            "rotary_percent": getattr(model, "rotary_percent", None),
            "rotary_interleaved": model.config.rotary_interleaved,
            "layernorm_epsilon": model.config.layernorm_epsilon,
            "padded_vocab_size": model.vocab_size,
            "max_sequence_length": model.max_sequence_length,
            "tie_word_embeddings": model.share_embeddings_and_output_weights,
        },
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "eod": tokenizer.eod},
    }
    if tokenizer.kind == "bpe":
        tokenizer.save(directory / TOKENIZER_FILE)
    elif tokenizer.kind == "sentencepiece":
        shutil.copyfile(Path(tokenizer.spec).expanduser(), directory / SENTENCEPIECE_FILE)
    tmp = directory / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, directory / RUN_FILE)


def read_run(tag_dir: Path) -> dict:
    """compact_run.json of a tag directory; ValueError (one line) when it is missing or of
    another format."""
    path = Path(tag_dir) / RUN_FILE
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing: the checkpoint was not written by a "
                         "compact-train that records its run (config and tokenizer)")
    run = json.loads(path.read_text())
    if run.get("format") != RUN_FORMAT:
        raise ValueError(f"{str(path)!r} has format {run.get('format')!r}, expected {RUN_FORMAT}")
    return run
