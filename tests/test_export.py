"""compact-export: a TP=2 x DP=2 ZeRO-3 compact-train checkpoint (RoPE, grouped queries, A not
yet merged) as a Hugging Face LLaMA whose logits equal the Megatron model's; HF -> plain
Megatron GPTModel; the seeded and data-aware P of the export equal the layers' own W_eff;
bad input gives one clear error."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from distributed import run_distributed_raw
from test_train import small

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SEQ = 16
WORLD = 4  # TP=2 x DP=2: ZeRO-3 partitions W0, A and the masters over 2 DP ranks


def _train_then_unmerged_step(rank, overrides, ckpt, out):
    """compact-train's run(), then one more optimizer step *without* the merge (A != 0, in
    its fp32 masters and module partitions), a checkpoint of that state, and the Megatron
    logits of a fixed batch (eval, gathered over TP) from the same engine."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import compact_dist.training.train as train
    from compact_dist.training.checkpoint import latest_tag, save_checkpoint
    from compact_dist.training.train_config import load_train_config

    captured = {}
    build_training_engine = train.build_training_engine  # the name train._build calls

    def capture(*args, **kwargs):
        captured["engine"], stepper = build_training_engine(*args, **kwargs)
        return captured["engine"], stepper

    train.build_training_engine = capture
    history = train.run(load_train_config(None, overrides))
    engine = captured["engine"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, SEQ + 1), generator=gen)
    tokens, labels = tokens[:, :-1].to(engine.device), tokens[:, 1:].to(engine.device)
    positions = torch.arange(SEQ, device=engine.device).expand(2, SEQ)
    engine.train()
    engine.backward(engine(tokens, positions, None, labels=labels).float().mean())
    engine.step()  # no SubspaceStepper.after_step: A stays in the checkpoint and the forward
    previous = Path(ckpt) / latest_tag(ckpt)

    def copy_run_files(directory):
        for name in ("compact_run.json", "tokenizer.json"):
            shutil.copy(previous / name, directory / name)

    save_checkpoint(engine, ckpt, history["step"] + 1, {"step": history["step"] + 1},
                    keep_last=5, write_run_files=copy_run_files)
    engine.eval()
    with torch.no_grad():
        logits = engine(tokens, positions, None).contiguous()  # [b, s, padded vocab / TP]
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, logits, group=ps.get_tensor_model_parallel_group())
    if rank == 0:
        torch.save({"tokens": tokens.cpu(), "logits": torch.cat(parts, -1).float().cpu()}, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    ckpt = tmp / "ckpt"
    overrides = small(tmp, "model.num_query_groups=2",  # rotary positions: the default
                      "parallel.tensor_model_parallel_size=2", "train.zero_stage=3",
                      "train.train_steps=2", "data.vocab_size=500", "data.max_bytes=100000",
                      f"checkpoint.dir={ckpt}", "checkpoint.keep_last=5")
    run_distributed_raw(_train_then_unmerged_step, WORLD, overrides, str(ckpt),
                        str(tmp / "megatron.pt"))
    return ckpt, torch.load(tmp / "megatron.pt")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from compact_dist.tools.export import export_checkpoint

    ckpt, _ = trained
    out = tmp_path_factory.mktemp("hf")
    init = torch.distributed.init_process_group
    torch.distributed.init_process_group = _no_process_group
    try:
        info = export_checkpoint(ckpt, out)
    finally:
        torch.distributed.init_process_group = init
    return out, info


def _no_process_group(*args, **kwargs):
    raise AssertionError("the export must not create a process group")


def test_hf_llama_logits_match_megatron(trained, exported):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from compact_dist.training.data import Tokenizer

    ckpt, ref = trained
    out, info = exported
    assert info["tp"] == 2 and info["compact_layers"] == 16  # 2 layers x 4 linears x 2 TP
    assert info["max_abs_factor"] > 1e-5  # the unmerged A is part of the export (~4e-4)
    assert info["tag_dir"].endswith("step_00000003")
    model = LlamaForCausalLM.from_pretrained(out).eval()
    c = model.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.hidden_size) == (2, 4, 64)
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    vocab = c.vocab_size
    assert vocab < ref["logits"].shape[-1]  # Megatron's padded rows are dropped
    diff = (logits - ref["logits"][..., :vocab]).abs().max().item()
    assert diff < 1e-4, diff

    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(ckpt / "step_00000003" / "tokenizer.json")
    text = "def export(model):\n    return {'llama': True}  # ok"
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    assert hf_tok.eos_token_id == ours.eod and len(hf_tok) == vocab


def test_hf_weights_load_into_plain_megatron(megatron_tp1, trained, exported):
    from transformers import LlamaForCausalLM

    from compact_dist.tools.hf_import import load_megatron_from_hf
    from compact_dist.core.subspace import compact_layers

    _, ref = trained
    out, _ = exported
    padded = ref["logits"].shape[-1]
    model = load_megatron_from_hf(out, padded_vocab_size=padded)
    assert not compact_layers(model) and model.vocab_size == padded
    tokens = ref["tokens"]
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)
        hf = LlamaForCausalLM.from_pretrained(out).eval()(tokens).logits
    vocab = hf.shape[-1]
    assert (logits[..., :vocab] - hf).abs().max().item() < 1e-4
    assert (logits[..., :vocab] - ref["logits"][..., :vocab]).abs().max().item() < 1e-4


@pytest.mark.parametrize("data_aware, base", [(False, "fp32"), (True, "fp32"),
                                              (False, "bf16_pair")])
def test_export_weight_is_the_layers_effective_weight(megatron_tp1, data_aware, base):
    """The export's W0 + s A P^T from checkpoint data (the rank file's projection record, the
    extra state's basis, a bf16 pair's low word) equals CompactLinearMixin.effective_weight
    for a seeded Gaussian P (non-zero epoch) and for a data-aware basis."""
    from gpt_utils import tiny_gpt

    from compact_dist.training.checkpoint import _rank_state
    from compact_dist.core.config import CompressionConfig
    from compact_dist.tools.checkpoint_shards import effective_weight
    from compact_dist.core.subspace import compact_layers

    model = tiny_gpt(CompressionConfig(projection="gaussian", update_scale=1.5,
                                       base_dtype=base))
    gen = torch.Generator().manual_seed(1)
    for layer in compact_layers(model):
        layer.subspace_factor.data.normal_(generator=gen)
        if base == "bf16_pair":
            assert layer.weight_lo.abs().max() > 0
        layer.projection_epoch = 3
        if data_aware:
            p = layer.projection
            layer.basis = torch.linalg.qr(torch.randn(
                p.local_blocks, p.block_in, p.block_rank, generator=gen))[0]
        layer._projection_cache.clear()
    entries = {e["name"]: e for e in _rank_state(model)["layers"]}
    state = model.state_dict()
    checked = 0
    for name, layer in model.named_modules():
        if layer in compact_layers(model):
            got = effective_weight(state, name, entries[name])
            assert torch.allclose(got, layer.effective_weight(), atol=1e-6, rtol=0), name
            assert (got - layer.weight.float()).abs().max() > 1e-2  # A P^T is really there
            checked += 1
    assert checked == 8


def _copy(ckpt: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(ckpt / "step_00000003", dst / "step_00000003")
    (dst / "latest").write_text("step_00000003")
    return dst


def _edit_run(ckpt: Path, edit) -> None:
    path = ckpt / "step_00000003" / "compact_run.json"
    run = json.loads(path.read_text())
    edit(run)
    path.write_text(json.dumps(run))


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "does not exist"),
    ("not_a_checkpoint", "no 'latest' file"),
    ("ffn_disagrees", r"linear_fc1 \(W_eff, TP rank 0\) has shape \(128, 64\), the run config "
                      r"implies \(96, 64\)"),
    ("layers_disagree", "checkpoint has 2 transformer layers, the run config says num_layers=3"),
    ("learned_positions", "'learned_absolute' position embeddings; a LLaMA has rotary ones"),
    ("missing_tp_rank", "holds 1 TP ranks' model states, the run config says "
                        "tensor_model_parallel_size=2"),
    ("missing_run_file", "compact_run.json' is missing"),
])
def test_bad_input_gives_one_clear_error(trained, tmp_path, case, message):
    from compact_dist.tools.export import export_checkpoint, main

    ckpt, _ = trained
    source = {"missing_dir": tmp_path / "nowhere", "not_a_checkpoint": tmp_path}.get(case)
    if source is None:
        source = _copy(ckpt, tmp_path)
        tag = source / "step_00000003"
        if case == "ffn_disagrees":
            _edit_run(source, lambda r: r["config"]["model"].update(ffn_hidden_size=96))
        elif case == "layers_disagree":
            _edit_run(source, lambda r: r["config"]["model"].update(num_layers=3))
        elif case == "learned_positions":
            _edit_run(source, lambda r: r["model"].update(position_embedding="learned_absolute"))
        elif case == "missing_tp_rank":
            for f in tag.glob("*mp_rank_01_*"):
                f.unlink()
        elif case == "missing_run_file":
            (tag / "compact_run.json").unlink()
    with pytest.raises(ValueError, match=message):
        export_checkpoint(source, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, no traceback
        main([str(source), str(tmp_path / "out")])
    text = str(exit_info.value.code)
    assert text.startswith("compact-export: error: ") and "\n" not in text
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_quick_start_checkpoint_exports_and_loads_in_transformers(tmp_path):
    """`compact-train` with a preset and no position setting (as the quick start runs it, on
    CPU), then `compact-export`: files with the umask's mode (not safetensors' 0600), a LLaMA
    and tokenizer that transformers loads and generates with."""
    import os
    import stat
    import subprocess
    import sys

    from transformers import AutoTokenizer, LlamaForCausalLM

    from compact_dist.tools.export import main

    root = Path(__file__).resolve().parents[1]
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "compact_dist.training.train", "--config",
         str(root / "configs/train/tiny.yaml"), "train.train_steps=2", f"checkpoint.dir={ckpt}",
         f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**env, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    umask = os.umask(0o027)
    try:
        main([str(ckpt), str(out)])
    finally:
        os.umask(umask)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    model = LlamaForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("def main(", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert model.config.max_position_embeddings == 32  # tiny.yaml's seq_length


def test_missing_export_dependency_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    import importlib.util

    from compact_dist.tools import export

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "safetensors" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path), str(tmp_path / "out")])
    text = str(exit_info.value.code)
    assert text == ("compact-export: error: safetensors not installed: pip install "
                    "'compact_dist[export]' (or pip install safetensors)")
    assert not (tmp_path / "out").exists()


def test_byte_tokenizer_exports_as_an_equivalent_hf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from compact_dist.training.data import Tokenizer
    from compact_dist.tools.hf_tokenizer import save_tokenizer

    run = {"tokenizer": {"kind": "byte", "vocab_size": 257, "eod": 256},
           "model": {"max_sequence_length": 64}}
    save_tokenizer(tmp_path, run, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "héllo wörld ✓\n\t  def f(x): return x  # ünïcode"
    ids = Tokenizer.byte().encode(text)
    assert hf(text)["input_ids"] == ids and hf.decode(ids) == text
    assert hf.eos_token_id == 256 and len(hf) == 257


def _run_files(tmp_path, tokenizer) -> dict:
    """write_run_files of a run with `tokenizer` (a stand-in for the trained GPTModel: only
    the attributes compact_run.json records)."""
    from types import SimpleNamespace

    from compact_dist.training.run_files import read_run, write_run_files
    from compact_dist.training.train_config import load_train_config

    model = SimpleNamespace(position_embedding_type="rope", vocab_size=640,
                            max_sequence_length=64, share_embeddings_and_output_weights=False,
                            config=SimpleNamespace(rotary_interleaved=False,
                                                   layernorm_epsilon=1e-5))
    cfg = load_train_config(None, [f"data.tokenizer={tokenizer.spec}"])
    tag = tmp_path / "tag"
    tag.mkdir(parents=True)
    write_run_files(tag, cfg, tokenizer, model)
    return read_run(tag)


def test_path_tokenizers_export_with_their_vocabulary_and_eod(tmp_path):
    """A run on a tokenizer.json path tokenizer (eod '</s>', not <|endoftext|>) exports that
    tokenizer with its size and '</s>' as eos; a SentencePiece run exports its model."""
    import io
    import random

    import sentencepiece as spm
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers
    from transformers import AutoTokenizer

    from compact_dist.tools.hf_tokenizer import save_tokenizer
    from compact_dist.training.tokenizer import load_tokenizer

    words = {w: i for i, w in enumerate(["alpha", "beta", "</s>", "[UNK]", "gamma"])}
    hf_tok = HF(models.WordLevel(words, unk_token="[UNK]"))
    hf_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok.save(str(tmp_path / "words.json"))
    tok = load_tokenizer(str(tmp_path / "words.json"))
    run = _run_files(tmp_path / "json", tok)
    assert run["tokenizer"] == {"kind": "bpe", "vocab_size": 5, "eod": 2}
    save_tokenizer(tmp_path / "json" / "tag", run, tmp_path / "json" / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "json" / "hf")
    assert len(hf) == 5 and hf.eos_token == "</s>" and hf.eos_token_id == 2
    assert hf("alpha gamma beta", add_special_tokens=False)["input_ids"] == [0, 4, 1]

    rng = random.Random(1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice("alpha beta gamma delta epsilon zeta eta "
                                                     "theta iota kappa".split())
                                         for _ in range(40)) for _ in range(50)]),
        model_writer=model, vocab_size=24, minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    sp_tok = load_tokenizer(str(tmp_path / "sp.model"))
    run = _run_files(tmp_path / "sp", sp_tok)
    assert run["tokenizer"] == {"kind": "sentencepiece", "vocab_size": 24, "eod": 2}
    save_tokenizer(tmp_path / "sp" / "tag", run, tmp_path / "sp" / "hf")
    out = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp" / "hf" / "tokenizer.model"))
    assert out.encode("alpha delta") == sp_tok.encode("alpha delta")


def _gpu_worker(rank, world, port, overrides, ckpt, out):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        _train_then_unmerged_step(rank, overrides, ckpt, out)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 training needs CUDA")
@pytest.mark.parametrize("stage, base", [(0, "fp32"), (1, "fp32"), (1, "bf16_pair"),
                                         (3, "bf16")])
def test_bf16_checkpoint_exports_on_gpu(tmp_path, stage, base):
    """bf16 on one GPU (TP=1): ZeRO-0 (BF16_Optimizer: the module's bf16 weights), ZeRO-1 (fp32
    masters, fp32 W0 or a bf16 pair), ZeRO-3 (bf16 W0 partitions); the fp32 HF logits agree
    with the bf16 Megatron ones to bf16 accuracy."""
    import torch.multiprocessing as mp
    from transformers import LlamaForCausalLM

    from conftest import free_port
    from compact_dist.tools.export import export_checkpoint

    ckpt = tmp_path / "ckpt"
    overrides = small(tmp_path, "model.num_query_groups=2",
                      f"train.zero_stage={stage}", "train.precision=bf16", "train.train_steps=2",
                      "data.vocab_size=500", "data.max_bytes=100000", f"checkpoint.dir={ckpt}",
                      f"compression.base_dtype={base}")
    mp.start_processes(_gpu_worker, args=(1, free_port(), overrides, str(ckpt),
                                          str(tmp_path / "megatron.pt")),
                       nprocs=1, join=True, start_method="spawn")
    ref = torch.load(tmp_path / "megatron.pt")
    info = export_checkpoint(ckpt, tmp_path / "hf")
    assert info["max_abs_factor"] > 0
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()(
            ref["tokens"].cpu()).logits
    expected = ref["logits"].float().cpu()[..., :logits.shape[-1]]
    error = (logits - expected).abs().max() / expected.abs().max()
    assert error < 3e-2, error.item()
