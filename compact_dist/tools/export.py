"""`compact-export CHECKPOINT_DIR OUT_DIR`: a compact-train checkpoint as a Hugging Face LLaMA.

    compact-export ckpt/ hf_model/            # the checkpoint `ckpt/latest` names
    compact-export ckpt/ hf_model/ --tag step_00000400 --dtype bf16

Writes OUT_DIR/config.json (LlamaConfig), OUT_DIR/model.safetensors and the run's tokenizer
(tokenizer.json, tokenizer_config.json, ...), loadable with `LlamaForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`. Everything runs on the CPU from the checkpoint files: no
process group, no GPU, no Megatron model.

The parts: the run's config and tokenizer from compact_run.json
(compact_dist/training/run_files.py), each TP shard's W_eff from DeepSpeed's files and
compact_rank*.pt (checkpoint_shards.py), the tokenizer files (hf_tokenizer.py); this module
gathers the TP shards into LLaMA's layout and writes the files. hf_import.py goes the other
way (HF safetensors -> a plain Megatron GPTModel, compression disabled).

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
`hf_import.load_megatron_from_hf` pads them back (with zeros) to the Megatron model's size.

Position embeddings: LLaMA is a rotary model. Runs with `position_embedding: rope` (the default
on every device: compact_dist.megatron.rope makes Megatron's RoPE run without CUDA) export; a
learned-absolute-position model is refused with one ValueError.

Dependencies: transformers and safetensors (the `export` extra); without them `compact-export`
says so in one line. Files are written with the process umask's usual mode.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from compact_dist.tools.checkpoint_shards import (
    compact_layers_by_tp_rank,
    effective_weight,
    resolve_tag_dir,
    tp_module_state,
)
from compact_dist.tools.hf_tokenizer import save_tokenizer
from compact_dist.training.run_files import read_run
from compact_dist.training.train_config import ModelConfig

EXPORT_EXTRA = "pip install 'compact_dist[export]'"  # transformers, safetensors (pyproject)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _shapes(run: dict) -> dict[str, int]:
    m = run["config"]["model"]
    hidden, heads = m["hidden_size"], m["num_attention_heads"]
    return {"hidden": hidden, "layers": m["num_layers"], "heads": heads,
            "groups": m["num_query_groups"] or heads, "head_dim": hidden // heads,
            "ffn": ModelConfig.model_construct(**m).ffn,
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
    mp_files = (glob.glob(str(tag_dir / "*mp_rank_*_model_states.pt"))  # DeepSpeed
                + glob.glob(str(tag_dir / "fsdp2_tp*")))  # train.engine=fsdp2
    found_tp = len({re.search(r"(mp_rank_|fsdp2_tp)(\d+)", f).group(2) for f in mp_files})
    if found_tp != tp:
        raise ValueError(f"{str(tag_dir)!r} holds {found_tp} TP ranks' model states, the run "
                         f"config says tensor_model_parallel_size={tp}")
    shards = [tp_module_state(tag_dir, t) for t in range(tp)]
    layers = compact_layers_by_tp_rank(tag_dir, tp)
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
            out.append(effective_weight(shards[t], name, layer))
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


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path,
                      tag: Optional[str] = None, dtype: torch.dtype = torch.float32) -> dict:
    """Write the HF LLaMA of a compact-train checkpoint to out_dir (config.json,
    model.safetensors, tokenizer files). checkpoint_dir: the `checkpoint.dir` of the run (its
    `latest`, or `tag`) or one tag directory. Returns {"tag_dir", "tp", "compact_layers",
    "max_abs_factor" (largest |A| merged), "parameters"}. Bad input: one ValueError."""
    from safetensors.torch import save_file

    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
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
