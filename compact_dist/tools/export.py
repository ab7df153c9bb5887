"""`compact-export CHECKPOINT_DIR OUT_DIR`: a compact-train checkpoint as a Hugging Face LLaMA.

    compact-export ckpt/ hf_model/            # the checkpoint `ckpt/latest` names
    compact-export ckpt/ hf_model/ --tag step_00000400 --dtype bf16

Writes OUT_DIR/config.json (LlamaConfig), OUT_DIR/model.safetensors and the run's tokenizer
(tokenizer.json, tokenizer_config.json, ...), loadable with `LlamaForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`. Everything runs on the CPU from the checkpoint files: no
process group, no GPU, no Megatron model. `load_megatron_from_hf` goes the other way (HF
safetensors -> a plain Megatron GPTModel, compression disabled).

What is read (one checkpoint tag, `compact_dist.deepspeed.checkpoint` layout):
- compact_run.json (the resolved TrainConfig and the model facts Megatron chose: position
  embedding, rotary base, norm epsilon, padded vocabulary, tied embeddings) and tokenizer.json,
  written by compact-train next to DeepSpeed's files;
- per TP rank t, DeepSpeed's files `*mp_rank_{t:02d}_*`. The module state holds every tensor
  at ZeRO 0-2 (trainable ones in the training dtype) and the layers' extra state (projection
  epoch, data-aware basis P) at every stage. Where ZeRO optimizer files exist (ZeRO 1-3), the
  trainable tensors are taken from their fp32 masters and the frozen W0 from DeepSpeed's
  frozen-parameter fragments (ZeRO-3: partitions over DP), merged by DeepSpeed's own
  `deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` on a view of the
  tag directory holding only that TP rank's files. ZeRO-0 with bf16 (DeepSpeed's
  BF16_Optimizer, no ZeRO partitions) is read from the module's bf16 weights;
- compact_rank{R}.pt of the rank with TP rank t and DP rank 0: per compact layer its module
  name, its `projection.Projection` (seed, layer id, blocks of this TP rank), mode and update
  scale.

Per compact layer and TP shard: W_eff = W0 + update_scale * A P^T (subspace mode; the
trainable W itself in unbiased mode), with P the data-aware basis of the extra state or the
seeded Gaussian blocks of the layer's projection epoch, through `projection.unproject`, the
code the layer's own `effective_weight` / `merge_subspace` use. A is its fp32 master
(ZeRO 1-3): zero after a merge in fp32; in a bf16 run the master keeps the bf16 rounding
residual the next step folds in, so the export includes it (a difference below bf16
resolution from the forward at the save).

TP gathering (Megatron-core 0.16.1 layouts, TP shards concatenated in TP-rank order):
- linear_qkv (column-parallel): rows grouped per query group, [q heads of the group, k, v]
  (each head_dim rows); a TP shard holds whole groups, so the shards concatenate, then each
  group is split into HF's q_proj / k_proj / v_proj;
- linear_fc1 (column-parallel, SwiGLU): each shard is [gate shard; up shard], so every shard
  is split in two before gate_proj = cat(gate shards), up_proj = cat(up shards);
- linear_proj, linear_fc2 (row-parallel): shards concatenate along the input dim;
- word embeddings, output layer (vocab-parallel): shards concatenate along the vocabulary.

Vocabulary: the export has the tokenizer's vocabulary (`vocab_size` = tokenizer size). The
rows Megatron pads to a multiple of 64 x TP are never a target and no token maps to them, so
they are dropped: logits of every real token equal Megatron's (Megatron's softmax also ran
over the padded rows, whose trained logits are very negative).
`load_megatron_from_hf` pads them back (with zeros) to the Megatron model's size.

Position embeddings: LLaMA is a rotary model. Runs with `position_embedding: rope` (the default
on every device: compact_dist.megatron.rope makes Megatron's RoPE run without CUDA) export; a
learned-absolute-position model is refused with one ValueError.

Dependencies: transformers and safetensors (the `export` extra); without them `compact-export`
says so in one line. Files are written with the process umask's usual mode.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

RUN_FILE = "compact_run.json"
TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"  # a data.tokenizer .model, copied as is
RUN_FORMAT = 1
EXPORT_EXTRA = "pip install 'compact_dist[export]'"  # transformers, safetensors (pyproject)
LATEST = "latest"  # compact_dist.deepspeed.checkpoint.LATEST (that module imports Megatron; this one not)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


# ------------------------------------------------------------------------ run description

def write_run_files(directory: Path, cfg, tokenizer, model: torch.nn.Module) -> None:
    """compact_run.json (+ tokenizer.json for BPE and tokenizer.json path tokenizers, or the
    SentencePiece .model as tokenizer.model) in a checkpoint tag directory (rank 0, from
    compact_dist.deepspeed.checkpoint.save_checkpoint). `model`: the Megatron GPTModel being trained."""
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
        import shutil

        shutil.copyfile(Path(tokenizer.spec).expanduser(), directory / SENTENCEPIECE_FILE)
    tmp = directory / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, directory / RUN_FILE)


def _resolve_tag_dir(checkpoint_dir: str | Path, tag: Optional[str]) -> Path:
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ValueError(f"checkpoint directory {str(root)!r} does not exist")
    if (root / RUN_FILE).is_file() and tag is None:
        return root  # a tag directory itself
    if tag is None:
        pointer = root / LATEST
        if not pointer.is_file():
            raise ValueError(f"{str(root)!r} has no {LATEST!r} file and no {RUN_FILE}: not a "
                             "compact-train checkpoint directory (or pass --tag)")
        tag = pointer.read_text().strip()
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise ValueError(f"checkpoint tag {tag!r} is missing in {str(root)!r}")
    return tag_dir


def read_run(tag_dir: Path) -> dict:
    path = Path(tag_dir) / RUN_FILE
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing: the checkpoint was not written by a "
                         "compact-train that records its run (config and tokenizer)")
    run = json.loads(path.read_text())
    if run.get("format") != RUN_FORMAT:
        raise ValueError(f"{str(path)!r} has format {run.get('format')!r}, expected {RUN_FORMAT}")
    return run


# ------------------------------------------------------------------- reading the shards

def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def _tp_module_state(tag_dir: Path, tp_rank: int) -> dict[str, Any]:
    """The module state of one TP rank, every tensor whole (TP-local shape), trainable ones
    from the fp32 masters where ZeRO optimizer files exist; extra states included."""
    mp = f"mp_rank_{tp_rank:02d}"
    model_files = sorted(glob.glob(str(tag_dir / f"*{mp}_model_states.pt")))
    optim_files = sorted(glob.glob(str(tag_dir / f"*zero_pp_rank_*_{mp}_optim_states.pt")))
    if not model_files:
        raise ValueError(f"{str(tag_dir)!r} has no DeepSpeed model states of TP rank {tp_rank} "
                         f"(*{mp}_model_states.pt)")
    state = dict(_load(Path(model_files[0]))["module"])
    if optim_files:
        first = torch.load(optim_files[0], map_location="cpu", weights_only=False,
                           mmap=True)["optimizer_state_dict"]  # a peek: nothing read in full
        if "zero_stage" in first:  # ZeRO 1-3 (BF16_Optimizer at stage 0 has no partitions)
            state.update(_zero_fp32_state(tag_dir, model_files + optim_files))
    return state


def _zero_fp32_state(tag_dir: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """DeepSpeed's consolidation (fp32 masters of trainable parameters, frozen parameters from
    their fragments) over a directory view that holds only one TP rank's files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as view:
        (Path(view) / "tag").mkdir()
        for f in files:
            os.symlink(os.path.abspath(f), Path(view) / "tag" / Path(f).name)
        quiet = io.StringIO()  # its progress prints and bars
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            merged = get_fp32_state_dict_from_zero_checkpoint(view, tag="tag")
    return {k: v.contiguous() for k, v in merged.items()}


def _compact_layers_by_tp_rank(tag_dir: Path, tp: int) -> list[dict[str, dict]]:
    """Per TP rank, {module name: entry} of its compact layers (compact_rank*.pt of the rank
    with that TP rank and DP rank 0; the DP replicas hold the same projections)."""
    found: dict[int, dict[str, dict]] = {}
    for path in sorted(tag_dir.glob("compact_rank*.pt")):
        state = _load(path)
        if "tp_rank" not in state:
            raise ValueError(f"{str(path)!r} does not record its TP rank and layer projections "
                             "(written by an older compact-train)")
        if state["dp_rank"] == 0:
            found[state["tp_rank"]] = {entry["name"]: entry for entry in state["layers"]}
    missing = [t for t in range(tp) if t not in found]
    if missing:
        raise ValueError(f"{str(tag_dir)!r} has no compact_rank*.pt of DP rank 0 and TP "
                         f"rank(s) {missing}")
    return [found[t] for t in range(tp)]


@torch.no_grad()
def _effective_weight(state: dict, name: str, layer: Optional[dict]) -> torch.Tensor:
    """fp32 W_eff of one TP shard of `name` (a linear's module name): W0 + s A P^T (W0: the
    weight, plus its low word for base_dtype bf16_pair)."""
    from compact_dist.core.projection import Projection, unproject

    weight = state[f"{name}.weight"].float()
    low = state.get(f"{name}.weight_lo")
    if low is not None:
        weight = weight + low.float()
    factor = state.get(f"{name}.subspace_factor")
    if factor is None or layer is None or layer["mode"] != "subspace":
        return weight
    extra = state.get(f"{name}._extra_state") or {}
    basis = extra.get("basis")
    epoch = int(extra.get("projection_epoch", layer["epoch"]))
    blocks = (basis.float() if basis is not None
              else Projection(**layer["projection"]).blocks(epoch, torch.device("cpu"),
                                                            torch.float32))
    if factor.shape != (weight.shape[0], blocks.shape[0] * blocks.shape[2]):
        raise ValueError(f"{name}: A of shape {tuple(factor.shape)} does not fit W0 "
                         f"{tuple(weight.shape)} and P blocks {tuple(blocks.shape)}")
    return weight + layer["scale"] * unproject(factor.float(), blocks)


# ------------------------------------------------------------------------------- export

def _shapes(run: dict) -> dict[str, int]:
    m = run["config"]["model"]
    hidden, heads = m["hidden_size"], m["num_attention_heads"]
    ffn = m["ffn_hidden_size"] or max(64, int(8 * hidden / 3) // 64 * 64)  # ModelConfig.ffn
    return {"hidden": hidden, "layers": m["num_layers"], "heads": heads,
            "groups": m["num_query_groups"] or heads, "head_dim": hidden // heads, "ffn": ffn,
            "tp": run["config"]["parallel"]["tensor_model_parallel_size"],
            "vocab": run["tokenizer"]["vocab_size"],
            "padded_vocab": run["model"]["padded_vocab_size"]}


def llama_config(run: dict):
    """transformers.LlamaConfig of the run's model (unpadded vocabulary, fp32)."""
    from transformers import LlamaConfig

    s, model = _shapes(run), run["model"]
    if model["position_embedding"] != "rope":
        raise ValueError(
            f"the model uses {model['position_embedding']!r} position embeddings; a LLaMA has "
            "rotary ones: train with model.position_embedding=rope to export it")
    if (model.get("rotary_percent") or 1.0) != 1.0 or model.get("rotary_interleaved"):
        raise ValueError("only full, non-interleaved rotary embeddings map onto LLaMA's")
    eod = run["tokenizer"]["eod"]
    return LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["groups"], head_dim=s["head_dim"], hidden_act="silu",
        max_position_embeddings=model["max_sequence_length"],
        rms_norm_eps=model["layernorm_epsilon"], rope_theta=float(model["rotary_base"]),
        tie_word_embeddings=bool(model["tie_word_embeddings"]), attention_bias=False,
        mlp_bias=False, bos_token_id=eod, eos_token_id=eod,
    )


def _check(name: str, tensor: torch.Tensor, expected: tuple) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the run "
                         f"config implies {tuple(expected)}")
    return tensor


def gather_hf_state_dict(tag_dir: Path, run: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF LLaMA state dict in fp32, info) from the TP shards of one checkpoint tag."""
    s = _shapes(run)
    tp, h, hd, g = s["tp"], s["hidden"], s["head_dim"], s["groups"]
    q_per_group = s["heads"] // g
    mp_files = glob.glob(str(tag_dir / "*mp_rank_*_model_states.pt"))
    found_tp = len({re.search(r"mp_rank_(\d+)", f).group(1) for f in mp_files})
    if found_tp != tp:
        raise ValueError(f"{str(tag_dir)!r} holds {found_tp} TP ranks' model states, the run "
                         f"config says tensor_model_parallel_size={tp}")
    shards = [_tp_module_state(tag_dir, t) for t in range(tp)]
    layers = _compact_layers_by_tp_rank(tag_dir, tp)
    if any(k.startswith("embedding.position_embeddings") for k in shards[0]):
        raise ValueError("the model has learned absolute position embeddings; a LLaMA has "
                         "rotary ones: train with model.position_embedding=rope to export it")
    info = {"tp": tp, "max_abs_factor": 0.0, "compact_layers": 0}

    def per_rank(name: str) -> list[torch.Tensor]:
        out = []
        for t in range(tp):
            if f"{name}.weight" not in shards[t]:
                raise ValueError(f"checkpoint of TP rank {t} has no tensor {name}.weight")
            layer = layers[t].get(name)
            factor = shards[t].get(f"{name}.subspace_factor")
            if layer is not None and factor is not None:
                info["max_abs_factor"] = max(info["max_abs_factor"], factor.abs().max().item())
                info["compact_layers"] += 1
            out.append(_effective_weight(shards[t], name, layer))
        return out

    def vocab_parallel(name: str) -> torch.Tensor:
        full = torch.cat([sh[name].float() for sh in shards], 0)
        return _check(name, full, (s["padded_vocab"], h))[: s["vocab"]]

    def replicated(name: str) -> torch.Tensor:
        if name not in shards[0]:
            raise ValueError(f"checkpoint has no tensor {name}")
        return _check(name, shards[0][name].float(), (h,))

    out = {"model.embed_tokens.weight": vocab_parallel("embedding.word_embeddings.weight"),
           "model.norm.weight": replicated("decoder.final_layernorm.weight")}
    if not run["model"]["tie_word_embeddings"]:
        out["lm_head.weight"] = vocab_parallel("output_layer.weight")
    found_layers = {int(m.group(1)) for k in shards[0] if (m := _LAYER.match(k))}
    if found_layers != set(range(s["layers"])):
        raise ValueError(f"checkpoint has {len(found_layers)} transformer layers, the run config "
                         f"says num_layers={s['layers']}")
    for i in range(s["layers"]):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = torch.cat(per_rank(mg + "self_attention.linear_qkv"), 0)
        qkv = _check(mg + "self_attention.linear_qkv (W_eff)", qkv,
                     (g * (q_per_group + 2) * hd, h)).view(g, q_per_group + 2, hd, h)
        out[hf + "self_attn.q_proj.weight"] = qkv[:, :q_per_group].reshape(-1, h)
        out[hf + "self_attn.k_proj.weight"] = qkv[:, q_per_group].reshape(-1, h)
        out[hf + "self_attn.v_proj.weight"] = qkv[:, q_per_group + 1].reshape(-1, h)
        out[hf + "self_attn.o_proj.weight"] = _check(
            mg + "self_attention.linear_proj (W_eff)",
            torch.cat(per_rank(mg + "self_attention.linear_proj"), 1), (h, s["heads"] * hd))
        fc1 = per_rank(mg + "mlp.linear_fc1")
        for t, shard in enumerate(fc1):
            _check(f"{mg}mlp.linear_fc1 (W_eff, TP rank {t})", shard, (2 * s["ffn"] // tp, h))
        out[hf + "mlp.gate_proj.weight"] = torch.cat([w.chunk(2, 0)[0] for w in fc1], 0)
        out[hf + "mlp.up_proj.weight"] = torch.cat([w.chunk(2, 0)[1] for w in fc1], 0)
        out[hf + "mlp.down_proj.weight"] = _check(
            mg + "mlp.linear_fc2 (W_eff)", torch.cat(per_rank(mg + "mlp.linear_fc2"), 1),
            (h, s["ffn"]))
        out[hf + "input_layernorm.weight"] = replicated(mg + "input_layernorm.weight")
        out[hf + "post_attention_layernorm.weight"] = replicated(mg + "pre_mlp_layernorm.weight")
    return {k: v.contiguous() for k, v in out.items()}, info


# ----------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of HF's ByteLevel)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_tokenizer():
    """compact_dist.training.data's byte tokenizer (ids 0..255 = bytes, 256 = end of document) as an HF
    `tokenizers` byte-level BPE without merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from compact_dist.training.data import EOD_TEXT

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[EOD_TEXT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TEXT, special=True)])
    return tok


def save_tokenizer(tag_dir: Path, run: dict, out_dir: Path) -> None:
    """The run's tokenizer as HF files (tokenizer.json, tokenizer_config.json, ...), its
    end-of-document token as bos / eos; a SentencePiece run's model as tokenizer.model."""
    from transformers import PreTrainedTokenizerFast

    kind = run["tokenizer"]["kind"]
    if kind == "sentencepiece":
        import shutil

        import sentencepiece

        path = tag_dir / SENTENCEPIECE_FILE
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is missing (the run's SentencePiece model)")
        size = sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
        if size != run["tokenizer"]["vocab_size"]:
            raise ValueError(f"{path} has {size} pieces, the run recorded "
                             f"{run['tokenizer']['vocab_size']}")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(out_dir) / SENTENCEPIECE_FILE)
        return
    if kind == "bpe":
        path = tag_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is missing (the run's BPE tokenizer)")
        hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer())
    hf.bos_token = hf.eos_token = hf.convert_ids_to_tokens(run["tokenizer"]["eod"])
    hf.model_max_length = run["model"]["max_sequence_length"]
    if len(hf) != run["tokenizer"]["vocab_size"]:
        raise ValueError(f"tokenizer has {len(hf)} tokens, the run recorded "
                         f"{run['tokenizer']['vocab_size']}")
    hf.save_pretrained(str(out_dir))
    # transformers 5 names the class TokenizersBackend, which 4.x does not know; both load
    # PreTrainedTokenizerFast
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2))


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path,
                      tag: Optional[str] = None, dtype: torch.dtype = torch.float32) -> dict:
    """Write the HF LLaMA of a compact-train checkpoint to out_dir (config.json,
    model.safetensors, tokenizer files). checkpoint_dir: the `checkpoint.dir` of the run (its
    `latest`, or `tag`) or one tag directory. Returns {"tag_dir", "tp", "compact_layers",
    "max_abs_factor" (largest |A| merged), "parameters"}. Bad input: one ValueError."""
    from safetensors.torch import save_file

    tag_dir = _resolve_tag_dir(checkpoint_dir, tag)
    run = read_run(tag_dir)
    config = llama_config(run)
    state, info = gather_hf_state_dict(tag_dir, run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers 5 calls the saved dtype `dtype`, 4.x `torch_dtype`
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    config.save_pretrained(str(out))
    weights = out / "model.safetensors"
    save_file({k: v.to(dtype) for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    _usual_mode(weights)  # safetensors creates it 0600
    save_tokenizer(tag_dir, run, out)
    return {"tag_dir": str(tag_dir), **info,
            "parameters": sum(v.numel() for v in state.values())}


def _usual_mode(path: Path) -> None:
    """The mode open() gives a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def missing_export_dependencies() -> list[str]:
    return [name for name in ("transformers", "safetensors")
            if importlib.util.find_spec(name) is None]


# --------------------------------------------------------------- HF -> Megatron (loader)

def hf_to_megatron_state_dict(hf_dir: str | Path, tensor_model_parallel_size: int = 1,
                              tp_rank: int = 0,
                              padded_vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The inverse of the export: HF LLaMA safetensors -> the state dict of TP rank `tp_rank`
    of a Megatron-core GPTModel built with compression disabled (Megatron's layer names and
    layouts: fused per-group QKV, per-shard [gate; up] fc1, vocab rows padded with zeros to
    padded_vocab_size, default: the HF vocabulary). fp32 tensors; no `_extra_state` keys."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    hf_dir = Path(hf_dir)
    for name in ("config.json", "model.safetensors"):
        if not (hf_dir / name).is_file():
            raise ValueError(f"{str(hf_dir / name)!r} is missing")
    c = LlamaConfig.from_pretrained(str(hf_dir))
    w = {k: v.float() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    tp, r = tensor_model_parallel_size, tp_rank
    h, heads, g = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or h // heads
    q_per_group = heads // g
    vocab = padded_vocab_size or c.vocab_size
    if heads % tp or g % tp or c.intermediate_size % tp or vocab % tp:
        raise ValueError(f"TP size {tp} does not divide heads, query groups, FFN and vocabulary")

    def rows(t: torch.Tensor) -> torch.Tensor:  # this rank's rows
        return t.chunk(tp, 0)[r]

    def cols(t: torch.Tensor) -> torch.Tensor:  # this rank's input columns
        return t.chunk(tp, 1)[r]

    def padded(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] > vocab:
            raise ValueError(f"padded vocabulary {vocab} is smaller than the HF one {t.shape[0]}")
        return rows(torch.cat([t, t.new_zeros(vocab - t.shape[0], t.shape[1])], 0))

    out = {"embedding.word_embeddings.weight": padded(w["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": w["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output_layer.weight"] = padded(w["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = w[hf + "self_attn.q_proj.weight"].view(g, q_per_group, hd, h)
        k = w[hf + "self_attn.k_proj.weight"].view(g, 1, hd, h)
        v = w[hf + "self_attn.v_proj.weight"].view(g, 1, hd, h)
        out[mg + "self_attention.linear_qkv.weight"] = rows(torch.cat([q, k, v], 1).reshape(-1, h))
        out[mg + "self_attention.linear_proj.weight"] = cols(w[hf + "self_attn.o_proj.weight"])
        out[mg + "mlp.linear_fc1.weight"] = torch.cat(
            [rows(w[hf + "mlp.gate_proj.weight"]), rows(w[hf + "mlp.up_proj.weight"])], 0)
        out[mg + "mlp.linear_fc2.weight"] = cols(w[hf + "mlp.down_proj.weight"])
        out[mg + "input_layernorm.weight"] = w[hf + "input_layernorm.weight"]
        out[mg + "pre_mlp_layernorm.weight"] = w[hf + "post_attention_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_megatron_from_hf(hf_dir: str | Path, padded_vocab_size: Optional[int] = None,
                          sequence_length: Optional[int] = None) -> torch.nn.Module:
    """A plain Megatron-core GPTModel (the compact spec with compression disabled: Megatron's
    own linears, RMSNorm, SwiGLU, RoPE with the HF rope_theta; as compact_dist.megatron.model builds
    it, plus the rotary base) on the CPU holding the HF model's weights, fp32, in eval mode.
    Needs Megatron's parallel state (its TP size and rank shard the weights)."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers import LlamaConfig

    from megatron.core.models.gpt import GPTModel

    from compact_dist.core.config import CompressionConfig
    from compact_dist.megatron.rope import install_host_rotary
    from compact_dist.megatron.spec import get_compact_gpt_block_spec

    c = LlamaConfig.from_pretrained(str(hf_dir))
    tp = ps.get_tensor_model_parallel_world_size()
    # transformers 5: rope_parameters["rope_theta"]; 4.x: rope_theta
    theta = ((getattr(c, "rope_parameters", None) or {}).get("rope_theta")
             or getattr(c, "rope_theta", 10000.0))
    config = TransformerConfig(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads, num_query_groups=c.num_key_value_heads,
        kv_channels=getattr(c, "head_dim", None), ffn_hidden_size=c.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=c.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_compact_gpt_block_spec(config, CompressionConfig(enabled=False)),
        vocab_size=padded_vocab_size or c.vocab_size,
        max_sequence_length=sequence_length or c.max_position_embeddings,
        position_embedding_type="rope", rotary_base=theta)
    install_host_rotary(model)
    state = hf_to_megatron_state_dict(hf_dir, tp, ps.get_tensor_model_parallel_rank(),
                                      model.vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"HF weights do not fit the Megatron model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()


# ---------------------------------------------------------------------------------- CLI

def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="compact-export",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("checkpoint_dir", help="checkpoint.dir of a compact-train run "
                        "(its `latest`) or one step_* directory")
    parser.add_argument("out_dir", help="directory for config.json, model.safetensors and "
                        "the tokenizer files")
    parser.add_argument("--tag", help="checkpoint tag (default: the one `latest` names)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of the saved weights (default fp32)")
    args = parser.parse_args(argv)
    missing = missing_export_dependencies()
    if missing:
        sys.exit(f"compact-export: error: {' and '.join(missing)} not installed: "
                 f"{EXPORT_EXTRA} (or pip install {' '.join(missing)})")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        info = export_checkpoint(args.checkpoint_dir, args.out_dir, args.tag, dtype)
    except ValueError as err:
        sys.exit(f"compact-export: error: {err}")
    print(f"exported {info['tag_dir']} (TP={info['tp']}, {info['compact_layers']} compact layer "
          f"shards merged, {info['parameters']:,} parameters) to {args.out_dir}")


if __name__ == "__main__":
    main()
