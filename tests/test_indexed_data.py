"""Indexed input: compact-preprocess -> megatron-core IndexedDataset, path tokenizers, blends
through megatron-core's builder, DP slicing, training and resume on a two-prefix blend, and the
bad inputs of docs/BAD_INPUT.md that need data files."""

from __future__ import annotations

import json
import random
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compact_dist.tools.preprocess import main as preprocess_main
from compact_dist.tools.preprocess import preprocess
from compact_dist.training.data import DataConfig
from compact_dist.training.tokenizer import Tokenizer, load_tokenizer
from distributed import run_distributed, run_distributed_raw

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """tok.json (BPE trained here), a.jsonl / b.jsonl (200 documents each) preprocessed into
    the prefixes a and b, a tokenizer without any end-of-document token, and a prefix whose
    ids exceed tok.json's vocabulary."""
    d = tmp_path_factory.mktemp("indexed")
    rng = random.Random(0)
    Tokenizer.train_bpe([_text(rng) for _ in range(300)], 300).save(d / "tok.json")
    for name in ("a", "b"):
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(200):
                f.write(json.dumps({"text": _text(rng), "title": name}) + "\n")
        preprocess([str(d / f"{name}.jsonl")], str(d / "tok.json"), str(d / name),
                   progress=False)
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"x": 0, "y": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(d / "noeod.json"))
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for name, top in (("big", 1000), ("only_bin", 10)):
        builder = IndexedDatasetBuilder(str(d / f"{name}.bin"), dtype=np.uint16)
        builder.add_document(np.arange(top, dtype=np.uint16), [top])
        builder.finalize(str(d / f"{name}.idx"))
    (d / "only_bin.idx").unlink()
    return d


def test_preprocess_jsonl_keys_text_and_workers_read_back_with_indexed_dataset(corpus, tmp_path,
                                                                             capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = load_tokenizer(str(corpus / "tok.json"))
    docs = [json.loads(line) for line in (corpus / "a.jsonl").read_text().splitlines()]
    ds = IndexedDataset(str(corpus / "a"))  # written by the fixture, one worker
    assert len(ds) == 200 and ds.index.dtype == np.uint16
    for i in (0, 77, 199):
        assert ds[i].tolist() == tok.encode(docs[i]["text"]) + [tok.eod]
    # two keys, two spawned workers, a directory holding a .jsonl and a text file
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text((corpus / "a.jsonl").read_text())
    (src / "z.txt").write_text("alpha beta\ngamma")
    preprocess_main(["--input", str(src), "--tokenizer", str(corpus / "tok.json"),
                     "--output-prefix", str(tmp_path / "out" / "c"), "--json-keys", "text",
                     "title", "--workers", "2", "--batch-size", "7", "--no-progress"])
    assert "201 documents" in capsys.readouterr().out
    text, title = (IndexedDataset(str(tmp_path / "out" / f"c_{k}")) for k in ("text", "title"))
    assert len(text) == len(title) == 201
    assert all(np.array_equal(text[i], ds[i]) for i in range(200))
    assert title[5].tolist() == tok.encode("a") + [tok.eod]
    assert text[200].tolist() == tok.encode("alpha beta\ngamma") + [tok.eod]
    # a bad line: FILE:LINE on stderr, status 2, no output files left
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(SystemExit) as info:
        preprocess_main(["--input", str(bad), "--tokenizer", str(corpus / "tok.json"),
                         "--output-prefix", str(tmp_path / "bad"), "--no-progress"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"compact-preprocess: {bad}:2: expected a string field 'text' (--json-keys)")
    assert not list(tmp_path.glob("bad.*.*")) and not list(tmp_path.glob("bad.bin"))


def test_tokenizer_kinds_and_eod(corpus, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(str(corpus / "tok.json"))
    assert (tok.vocab_size, tok.eod, tok.kind) == (300, 0, "bpe")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tok.json"), eos_token="alpha")
    hf.save_pretrained(str(tmp_path / "hfdir"))
    from_dir = load_tokenizer(str(tmp_path / "hfdir"))  # AutoTokenizer, local files only
    assert from_dir.eod == from_dir._hf.token_to_id("alpha") != 0  # the directory's eos_token
    assert from_dir.encode("beta gamma") == tok.encode("beta gamma")
    assert load_tokenizer(str(corpus / "tok.json"), "beta").eod == tok._hf.token_to_id("beta")
    with pytest.raises(ValueError, match=r"^data.eod_token='nope' is not in the vocabulary"):
        load_tokenizer(str(corpus / "tok.json"), "nope")
    with pytest.raises(ValueError, match=r"has no end-of-document token .*set data.eod_token$"):
        load_tokenizer(str(corpus / "noeod.json"))
    (tmp_path / "sp.model").write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(ValueError, match=r"is a SentencePiece model, which needs the "
                                         r"sentencepiece package: pip install sentencepiece$"):
        load_tokenizer(str(tmp_path / "sp.model"))


def test_sentencepiece_model_tokenizes_and_preprocesses(corpus, tmp_path):
    import io

    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = random.Random(1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([_text(rng) for _ in range(100)]),
                                   model_writer=model, vocab_size=30, minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert (tok.kind, tok.vocab_size, tok.eod) == ("sentencepiece", 30, 2)  # eos </s>
    assert tok.decode(tok.encode("alpha beta") + [tok.eod]) == "alpha beta"
    preprocess([str(corpus / "a.jsonl")], str(tmp_path / "sp.model"), str(tmp_path / "sp"),
               progress=False)
    first = json.loads((corpus / "a.jsonl").read_text().splitlines()[0])["text"]
    ds = IndexedDataset(str(tmp_path / "sp"))  # held: its items view its memory map
    assert ds[0].tolist() == tok.encode(first) + [2]


def test_separate_validation_blend_and_a_path_tokenizer_for_files(corpus, tmp_path):
    """data.valid_paths: validation reads only its own prefix (one prefix per split needs no
    process group); source=files with data.tokenizer=tok.json tokenizes with that file."""
    from compact_dist.training.data import build_data

    tok = load_tokenizer(str(corpus / "tok.json"))
    cfg = DataConfig(source="indexed", paths=[f"{corpus}/a"], valid_paths=[f"{corpus}/b"],
                     tokenizer=f"{corpus}/tok.json", cache_dir=str(tmp_path / "cache"))
    _, train, valid = build_data(cfg, 32, 2, train_samples=20, valid_samples=4)
    summary = "\n".join(train.summary)
    assert f"valid {corpus}/b: weight 1.000, 200 documents" in summary, summary
    assert f"train {corpus}/a: weight 1.000, 200 documents" in summary
    docs = {n: "\0".join(json.loads(x)["text"] for x in
                          (corpus / f"{n}.jsonl").read_text().splitlines()) for n in "ab"}
    pieces = [tok.decode(piece) for batch in valid(3) for row in batch["tokens"].tolist()
              for piece in np.split(row, np.flatnonzero(np.asarray(row) == tok.eod))]
    pieces = [p.strip() for p in pieces if len(p) > 40]  # samples span shuffled documents
    assert pieces and all(p in docs["b"] and p not in docs["a"] for p in pieces), pieces
    files = DataConfig(source="files", paths=[str(corpus / "a.jsonl")],
                       tokenizer=str(corpus / "tok.json"), cache_dir=str(tmp_path / "c2"))
    got, it, _ = build_data(files, 32, 2, train_samples=8, valid_samples=2)
    assert (got.vocab_size, got.eod) == (300, 0)
    first = json.loads((corpus / "a.jsonl").read_text().splitlines()[0])["text"]
    assert next(it)["tokens"].max() < 300 and got.encode(first) == tok.encode(first)


def _dp_batches(rank, corpus, cache, out):
    """Rank r of DP=2 (micro 2) and, on each rank, the DP=1 stream (micro 4) of one blend."""
    from compact_dist.training.data import build_data

    cfg = DataConfig(source="indexed", paths=["0.4", f"{corpus}/a", "0.6", f"{corpus}/b"],
                     tokenizer=f"{corpus}/tok.json", cache_dir=cache, seed=5)
    _, mine, valid = build_data(cfg, 32, 2, rank, 2, train_samples=48, valid_samples=8)
    _, ref, ref_valid = build_data(cfg, 32, 4, 0, 1, train_samples=48, valid_samples=8)
    got = {"mine": [next(mine)["tokens"] for _ in range(12)],
           "ref": [next(ref)["tokens"] for _ in range(12)],
           "valid": [b["tokens"] for b in valid()], "ref_valid": [b["tokens"] for b in ref_valid()],
           "summary": mine.summary}
    torch.save(got, f"{out}/rank{rank}.pt")


def test_dp2_ranks_read_disjoint_slices_of_one_global_order(corpus, tmp_path):
    run_distributed(_dp_batches, 2, str(corpus), str(tmp_path / "cache"), str(tmp_path), tp=1)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    rows = {r: [tuple(t.tolist()) for b in got[r]["mine"] for t in b] for r in range(2)}
    assert len(rows[0]) == len(rows[1]) == 24 and not set(rows[0]) & set(rows[1])
    for k in range(12):  # the DP=1 batch is rank 0's rows then rank 1's
        assert torch.equal(torch.cat([got[0]["mine"][k], got[1]["mine"][k]]), got[0]["ref"][k])
    for k, batch in enumerate(got[0]["ref_valid"]):
        assert torch.equal(torch.cat([got[0]["valid"][k], got[1]["valid"][k]]), batch)
    summary = "\n".join(got[0]["summary"])
    assert f"train {corpus}/a: weight 0.400" in summary and "this run: 48 samples" in summary
    cached = [p.name for p in (tmp_path / "cache").iterdir()]
    assert any("GPTDataset-train" in n for n in cached) and any("BlendedDataset" in n
                                                               for n in cached)


def _train_then_resume(rank, common, ckpt, out):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    full = run(load_train_config(None, common))["losses"]
    (Path(ckpt) / "latest").write_text("step_00000005")
    parallel_state.destroy_model_parallel()
    resumed = run(load_train_config(None, common))["losses"]
    Path(out).write_text(json.dumps({"full": full, "resumed": resumed}))
    dist.barrier()


def test_train_10_steps_on_a_blend_and_resume_at_5(corpus, tmp_path, capfd):
    from test_train import small

    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, "data.source=indexed", f"data.tokenizer={corpus}/tok.json",
                   f"data.paths=[0.3, {corpus}/a, 0.7, {corpus}/b]", "train.train_steps=10",
                   "data.max_bytes=8000000", "data.vocab_size=2048", f"checkpoint.dir={ckpt}",
                   "checkpoint.save_interval=5", "checkpoint.keep_last=5")
    out = tmp_path / "out.json"
    run_distributed_raw(_train_then_resume, 1, common, str(ckpt), str(out))
    got = json.loads(out.read_text())
    assert len(got["full"]) == 10 and len(got["resumed"]) == 5
    assert got["resumed"] == pytest.approx(got["full"][5:], rel=1e-6, abs=1e-6), got
    printed = capfd.readouterr().out
    assert f"  train {corpus}/b: weight 0.700" in printed, printed[-3000:]


# ----------------------------------------------------------------------------- bad input

DATA_TEST = "test_indexed_data.py::test_bad_indexed_input_row"


def _rows():
    from test_bad_input import ROWS

    return [(g, p) for g, p, t in ROWS if t == DATA_TEST]


@pytest.mark.parametrize("given, printed", _rows(), ids=[g for g, _ in _rows()])
def test_bad_indexed_input_row(given, printed, corpus, monkeypatch, capsys):
    """docs/BAD_INPUT.md rows naming this test: `/data` in them stands for the corpus fixture's
    directory (tok.json, prefixes a and b, big: ids beyond tok.json's vocabulary, only_bin:
    no .idx, noeod.json: no end-of-document token)."""
    from test_bad_input import run_main

    words = [w.replace("/data", str(corpus)) for w in shlex.split(given)]
    status, lines = run_main(words, monkeypatch, capsys)
    assert status == 2 and [line.replace(str(corpus), "/data") for line in lines] == [printed]


def test_bad_indexed_rows_are_listed():
    assert len(_rows()) >= 7
