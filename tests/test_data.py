"""Data pipeline of the stdlib / files sources: corpus, tokenizers, the tokenized cache (Megatron
indexed files), splits, and reading it through the indexed path (GPTDataset): DP slicing,
resume, summary."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from compact_dist.training import data as D
from compact_dist.training.data import DataConfig, build_data

SMALL = dict(max_bytes=300_000, vocab_size=512)


@pytest.fixture(scope="module")
def byte_cfg(tmp_path_factory) -> DataConfig:
    return DataConfig(tokenizer="byte", cache_dir=str(tmp_path_factory.mktemp("byte")), **SMALL)


@pytest.fixture(scope="module")
def byte_dir(byte_cfg) -> Path:
    return D.prepare_dataset(byte_cfg)[1]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    cfg = DataConfig(tokenizer="bpe", cache_dir=str(tmp_path_factory.mktemp("bpe")), **SMALL)
    return cfg, *D.prepare_dataset(cfg)


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("tokens", "labels", "position_ids"))


TEXT = "def f(x):\n    return x ** 2  # héllo wörld → 🎉\n\r\n\tclass A: pass\n"


def test_byte_tokenizer_roundtrip():
    tok = D.Tokenizer.byte()
    ids = tok.encode(TEXT)
    assert (tok.vocab_size, tok.eod) == (257, 256)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids[:5] + [tok.eod] + ids[5:]) == TEXT  # eod is dropped


def test_bpe_tokenizer_roundtrip_cached(bpe):
    cfg, tok, path = bpe
    assert (tok.vocab_size, tok.eod) == (512, 0)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and all(0 <= i < 512 for i in ids)
    code = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tok.encode(code)) < len(code.encode()) / 2  # merges were learned
    assert (path / "tokenizer.json").is_file()
    mtime = (path / "train.bin").stat().st_mtime_ns
    tok2, path2 = D.prepare_dataset(cfg)  # second call reuses the cache, reloads the tokenizer
    assert path2 == path and (path / "train.bin").stat().st_mtime_ns == mtime
    assert tok2.encode(TEXT) == ids
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_stdlib_corpus_capped_and_without_tests():
    cfg = DataConfig(max_bytes=300_000)
    docs = D.read_corpus(cfg)
    assert sum(len(d.encode()) for d in docs) == 300_000  # the stdlib has more: capped exactly
    files = cfg.check_paths()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100 and all(f.suffix == ".py" and f.is_relative_to(stdlib) for f in files)
    assert not [f for f in files if {"test", "tests", "site-packages"} & set(f.parts)]


def test_indexed_files_and_disjoint_split(byte_cfg, byte_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = D.read_corpus(byte_cfg)
    tok = D.Tokenizer.byte()
    split = {}
    for name in ("train", "valid"):
        ds = IndexedDataset(str(byte_dir / name))
        seqs = [ds[i] for i in range(len(ds))]
        assert len(seqs) > 0 and len(ds.document_indices) == len(seqs) + 1
        assert all(s[-1] == tok.eod and (s[:-1] != tok.eod).all() for s in seqs)
        split[name] = [tok.decode(s.tolist()) for s in seqs]
    train_idx, valid_idx = D.split_documents(len(docs), byte_cfg.valid_fraction, byte_cfg.seed)
    assert not set(train_idx) & set(valid_idx) and len(train_idx) + len(valid_idx) == len(docs)
    assert split["train"] == [docs[i] for i in train_idx]
    assert split["valid"] == [docs[i] for i in valid_idx]
    meta = json.loads((byte_dir / "meta.json").read_text())
    assert meta["valid_documents"] == len(valid_idx) == max(1, round(0.05 * len(docs)))


def test_samples_are_pieces_of_train_documents(byte_cfg, byte_dir):
    """A sample is s + 1 consecutive tokens of megatron-core's document order: split at EOD,
    every piece is text of a training document; labels are the tokens shifted by one."""
    docs = D.read_corpus(byte_cfg)
    train_idx, valid_idx = D.split_documents(len(docs), byte_cfg.valid_fraction, byte_cfg.seed)
    train_text = "\0".join(docs[i] for i in train_idx)
    tok, it, _ = build_data(byte_cfg, 100, 4, train_samples=40, valid_samples=4)
    batch = next(it)
    assert batch["tokens"].shape == batch["labels"].shape == (4, 100)
    assert batch["tokens"].dtype == torch.long
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"][1], torch.arange(100))
    for row in torch.cat([batch["tokens"], batch["labels"][:, -1:]], 1).tolist():
        for piece in np.split(np.asarray(row), np.flatnonzero(np.asarray(row) == tok.eod)):
            text = bytes(int(i) for i in piece if i != tok.eod).decode("utf-8", "ignore")
            assert text[1:-1] in train_text  # cut ends may split a UTF-8 character
    assert it.summary[1].startswith(f"  train {byte_dir / 'train'}: weight 1.000, "
                                    f"{len(train_idx)} documents")


def test_same_batches_as_indexed_source_on_the_cached_prefixes(byte_cfg, byte_dir):
    """One data path: the default source reads its cache exactly as data.source=indexed
    reads the same prefixes (train / validation blend), for the same seed and run length."""
    indexed = DataConfig(source="indexed", paths=[str(byte_dir / "train")],
                         valid_paths=[str(byte_dir / "valid")], tokenizer="byte",
                         cache_dir=byte_cfg.cache_dir, seed=byte_cfg.seed)
    runs = [build_data(c, 64, 3, train_samples=30, valid_samples=6) for c in (byte_cfg, indexed)]
    assert _same(_batches(runs[0].train, 10), _batches(runs[1].train, 10))
    assert _same(list(runs[0].valid_batches(2)), list(runs[1].valid_batches(2)))


def test_dp_ranks_partition_the_single_rank_stream(byte_cfg):
    samples = 3 * 12  # the run's sample count fixes megatron-core's order
    ref = _batches(build_data(byte_cfg, 1024, 4, train_samples=samples, valid_samples=4)[1], 9)
    for dp in (2, 4):
        ranks = [_batches(build_data(byte_cfg, 1024, 4 // dp, r, dp, train_samples=samples,
                                     valid_samples=4)[1], 9) for r in range(dp)]
        for k in range(9):
            joined = torch.cat([ranks[r][k]["tokens"] for r in range(dp)])
            assert torch.equal(joined, ref[k]["tokens"])
    # consumed_samples is global: b * dp_size per micro-step on every rank
    it = build_data(byte_cfg, 1024, 2, 1, 2, train_samples=samples, valid_samples=4)[1]
    assert it.state_dict()["consumed_samples"] == 0
    next(it)
    assert it.state_dict()["consumed_samples"] == 4


def test_resume_reproduces_next_batches_across_epoch(byte_cfg):
    """A resumed iterator continues with the next unseen samples, across an epoch boundary
    (a run of 2.5 epochs of the training split)."""
    def fresh(seed=byte_cfg.seed):
        cfg = byte_cfg.model_copy(update={"seed": seed})
        return build_data(cfg, 1024, 3, 1, 2, train_samples=samples, valid_samples=4)[1]

    per_epoch = len(build_data(byte_cfg, 1024, 6, train_samples=6, valid_samples=4)[1].samples)
    samples = 5 * per_epoch // 2
    full = fresh()
    ref = _batches(full, samples // 6)
    assert "warning: the run repeats data" in "\n".join(full.summary)
    for stop in (5, per_epoch // 6 - 1, per_epoch // 6 + 2):  # tails cross an epoch boundary
        it = fresh()
        _batches(it, stop)
        state = json.loads(json.dumps(it.state_dict()))  # survives serialisation
        resumed = fresh()
        resumed.load_state_dict(state)
        assert resumed.consumed_samples == stop * 6
        assert _same(_batches(resumed, per_epoch // 6 + 2), ref[stop: stop + per_epoch // 6 + 2])
    with pytest.raises(ValueError, match="seed"):
        fresh(seed=12).load_state_dict(full.state_dict())


def test_resume_refuses_a_run_length_that_changes_the_sample_order(byte_cfg):
    """megatron-core's GPTDataset order depends on the run's total samples (its epochs): a
    resume whose train.train_steps changes that order raises instead of reading other
    samples; a change that keeps the order (inside the first epoch) resumes as before."""
    def data(train_samples):
        return build_data(byte_cfg, 1024, 4, train_samples=train_samples, valid_samples=4)[1]

    per_epoch = len(data(4).samples)
    short, long = data(2 * per_epoch + per_epoch // 10), data(4 * per_epoch - 1)
    assert not np.array_equal(short.samples[0], long.samples[0])  # the order differs
    _batches(short, 3)
    state = json.loads(json.dumps(short.state_dict()))
    with pytest.raises(ValueError, match="differ from the checkpointed run's"):
        long.load_state_dict(state)
    first, extended = data(per_epoch // 3), data(per_epoch // 2)  # one epoch both
    ref = _batches(data(per_epoch // 2), 6)
    _batches(first, 3)
    extended.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert _same(_batches(extended, 3), ref[3:])


def test_valid_batches_fixed_and_dp_disjoint(bpe):
    cfg = bpe[0]
    tok, train, valid = build_data(cfg, 64, 2, 0, 1, train_samples=20, valid_samples=8)
    first, again = list(valid()), list(valid())
    assert len(first) > 2 and _same(first, again)
    assert len(list(valid(2))) == 2
    assert _same(list(valid(2)), first[:2])
    ranks = [list(build_data(cfg, 64, 1, r, 2, train_samples=20, valid_samples=8).valid_batches())
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(first)
    for k, batch in enumerate(first):  # rank r holds row r of the dp=1 batch
        assert torch.equal(batch["tokens"], torch.cat([ranks[0][k]["tokens"], ranks[1][k]["tokens"]]))
    assert next(train)["tokens"].max() < tok.vocab_size
    # eval_batches beyond the split: one pass over its samples, none read twice
    meta = json.loads((bpe[2] / "meta.json").read_text())
    everything = list(build_data(cfg, 64, 2, train_samples=20, valid_samples=10**5)
                      .valid_batches(10**5))
    assert len(everything) == (meta["valid_tokens"] - 1) // 64 // 2
    rows = [tuple(r) for b in everything for r in b["tokens"].tolist()]
    assert len(set(rows)) == len(rows)


def test_files_source_txt_and_jsonl(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = [f"plain text document number {i}. " * 40 for i in range(6)]
    for i, t in enumerate(texts[:3]):
        (corpus / f"doc{i}.txt").write_text(t)
    with open(corpus / "sub" / "more.jsonl", "w") as f:
        for t in texts[3:]:
            f.write(json.dumps({"body": t, "id": 1}) + "\n\n")
    cfg = DataConfig(source="files", paths=[str(corpus / "*.txt"), str(corpus / "**/*.jsonl")],
                     jsonl_key="body", tokenizer="byte", valid_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))
    assert D.read_corpus(cfg) == texts
    tok, train, valid = build_data(cfg, 32, 2, train_samples=8, valid_samples=2)
    train_idx, valid_idx = D.split_documents(6, 0.2, cfg.seed)
    assert len(valid_idx) == 1
    row = next(train)["tokens"][0].tolist()
    pieces = [tok.decode(p) for p in np.split(row, np.flatnonzero(np.asarray(row) == tok.eod))]
    assert sum(map(len, pieces)) >= 31 and all(any(p in texts[i] for i in train_idx)
                                               for p in pieces)
    assert len(list(valid())) >= 1
    bad = corpus / "bad.jsonl"
    bad.write_text('{"body": "ok"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*'body'"):
        D.read_corpus(cfg.model_copy(update={"paths": [str(bad)]}))


@pytest.mark.parametrize("kwargs, match", [
    (dict(valid_fraction=0.7), "valid_fraction"),
    (dict(valid_fraction=0.0), "valid_fraction"),
    (dict(source="files"), "paths"),
    (dict(paths=["x.txt"]), "paths"),
    (dict(vocab_size=10), "vocab_size"),
    (dict(source="indexed", paths=["/d/a"]), "tokenizer"),
    (dict(max_bytes=-1), "max_bytes"),
    (dict(shuffle=True), "shuffle"),
])
def test_bad_configs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_glob_matching_nothing_raises_before_any_process_group(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt"), str(tmp_path / "*.md")])
    with pytest.raises(ValueError, match=r"no files match .*\*\.md"):
        cfg.check_paths()
    assert DataConfig(source="files", paths=[str(tmp_path / "*.txt")]).check_paths() == [
        tmp_path / "a.txt"]


def _two_rank_build(rank, cache_dir, out_dir):
    if rank == 1:  # only global rank 0 may build; rank 1 must wait at the barrier
        def fail(*args):
            raise AssertionError("rank 1 built the dataset")
        D._build = fail
    cfg = DataConfig(cache_dir=cache_dir, max_bytes=200_000, vocab_size=300)
    tok, train, valid = build_data(cfg, 64, 2, rank, 2, train_samples=12, valid_samples=4)
    bad = Path(out_dir) / "bad.jsonl"  # rank 0's build error reaches the waiting rank too
    if rank == 0:
        bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    torch.distributed.barrier()
    try:
        build_data(DataConfig(source="files", paths=[str(bad)], tokenizer="byte",
                              cache_dir=cache_dir), 64, 2, rank, 2, train_samples=12,
                   valid_samples=4)
        error = None
    except ValueError as err:
        error = str(err)
    own = Path(out_dir) / f"corpus{rank}.jsonl"  # as node-local copies that differ
    own.write_text('{"text": "the same words, again and again"}\n' * (20 + rank))
    try:
        build_data(DataConfig(source="files", paths=[str(own)], tokenizer="byte",
                              cache_dir=cache_dir, valid_fraction=0.2), 8, 2, rank, 2,
                   train_samples=4, valid_samples=2)
        other = None
    except ValueError as err:
        other = str(err)
    torch.save({"tok": tok.encode(TEXT), "train": _batches(train, 3), "valid": list(valid(2)),
                "error": error, "other": other}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_rank0_builds_others_wait(tmp_path):
    from distributed import run_distributed

    cache = tmp_path / "cache"
    run_distributed(_two_rank_build, 2, str(cache), str(tmp_path), tp=1)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    built = [p for p in cache.iterdir() if p.is_dir()]
    # the default corpus and rank 0's own corpus file; no temporaries left
    assert len(built) == 2 and all((b / "meta.json").is_file() for b in built)
    assert got[0]["tok"] == got[1]["tok"]
    assert got[0]["error"].endswith("bad.jsonl:2: expected an object with a string field 'text' "
                                    "(data.jsonl_key)")
    assert got[1]["error"] == "rank 0 could not tokenize the corpus: " + got[0]["error"]
    for rank in range(2):  # every rank stops, rank 0 too (no rank left at a collective)
        assert "rank(s) 1 see other corpus or tokenizer files than rank 0" in got[rank]["other"]
    cfg = DataConfig(cache_dir=str(cache), max_bytes=200_000, vocab_size=300)
    _, train, valid = build_data(cfg, 64, 4, 0, 1, train_samples=12, valid_samples=4)
    assert len(list(cache.iterdir())) > 1  # megatron-core's index caches next to it
    for k, batch in enumerate(_batches(train, 3)):
        joined = torch.cat([got[0]["train"][k]["tokens"], got[1]["train"][k]["tokens"]])
        assert torch.equal(joined, batch["tokens"])


def test_tokenizer_train_bytes_samples_spread_documents(tmp_path):
    docs = [f"doc{i:03d} " + "x" * (10 + i % 7) for i in range(100)]
    total = sum(len(d.encode()) for d in docs)
    sizes = [len(d.encode()) for d in docs]
    assert list(D.tokenizer_sample(docs, sizes, None)) == docs
    assert list(D.tokenizer_sample(docs, sizes, total)) == docs
    sample = list(D.tokenizer_sample(iter(docs), sizes, 300))  # streams
    stride = -(-total // 300)
    assert stride > 1 and sum(len(d.encode()) for d in sample) <= 300
    assert sample[:-1] == docs[::stride][: len(sample) - 1]  # every stride-th, spread out
    assert docs[::stride][len(sample) - 1].startswith(sample[-1])  # the last one cut to fit
    assert int(sample[-1][3:6]) > 50  # reaches the second half of the corpus, not a prefix
    assert list(D.tokenizer_sample(["é" * 10], [20], 5)) == ["éé"]  # cut on a UTF-8 boundary
    # the dataset: BPE trained on the sample, every document tokenized; its own cache key
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 30})
                              + "\n" for i in range(40)))
    cfg = DataConfig(source="files", paths=[str(corpus)], vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    budget = 3000
    _, full_dir = D.prepare_dataset(cfg)
    tok, sub_dir = D.prepare_dataset(cfg.model_copy(update={"tokenizer_train_bytes": budget}))
    assert sub_dir != full_dir
    meta, full_meta = (json.loads((d / "meta.json").read_text()) for d in (sub_dir, full_dir))
    docs = D.read_corpus(cfg)
    assert meta["documents"] == full_meta["documents"] == 40
    assert full_meta["tokenizer_train_documents"] == 40
    assert meta["tokenizer_train_bytes"] <= budget and meta["tokenizer_train_documents"] < 40
    assert meta["train_tokens"] + meta["valid_tokens"] == sum(
        len(ids) + 1 for ids in tok.encode_batch(docs))


def test_directory_paths_and_summary_warnings(tmp_path):
    """A directory in data.paths means the files under it; the start-up summary counts the
    splits and warns when max_bytes truncates the corpus and when the run repeats data."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(4):
        (corpus / ("sub" if i % 2 else "") / f"d{i}.txt").write_text(f"document {i} " * 50)
    cfg = DataConfig(source="files", paths=[str(corpus)], tokenizer="byte", max_bytes=1500,
                     valid_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    assert cfg.check_paths() == sorted(corpus.rglob("*.txt"))
    _, train, _ = build_data(cfg, 16, 2, train_samples=1000, valid_samples=2)
    summary = "\n".join(train.summary)
    assert "data: files, tokenizer byte (vocab 257, eod 256), 3 documents split by " \
        "data.valid_fraction=0.3" in summary, summary
    assert "/train: weight 1.000, 2 documents" in summary
    assert "/valid: weight 1.000, 1 documents" in summary, summary
    assert "this run: 1,000 samples x 16 = 16,000 tokens" in summary
    assert "warning: the run repeats data" in summary
    assert "warning: data.max_bytes=1,500 truncated the corpus" in summary
    with pytest.raises(ValueError, match=r"the train split of the corpus has \d+ tokens, not one "
                                         r"sample of model.seq_length\+1=100001: raise "):
        build_data(cfg, 10**5, 2, train_samples=10, valid_samples=2)
    whole = cfg.model_copy(update={"max_bytes": 10**6})
    assert "warning" not in "\n".join(build_data(whole, 16, 2, train_samples=10,
                                                  valid_samples=2)[1].summary)


def test_cache_hit_reads_no_corpus_and_a_changed_file_rebuilds(tmp_path, monkeypatch):
    """The ranks that wait (and every restart) find the tokenized corpus from file metadata
    alone: no corpus text is read into memory; editing a corpus file makes a new cache entry."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(f"document {i} " * 40)
    cfg = DataConfig(source="files", paths=[str(corpus)], tokenizer="byte", valid_fraction=0.3,
                     cache_dir=str(tmp_path / "cache"))
    _, built = D.prepare_dataset(cfg)
    real = D._file_documents

    def no_reading(*args):
        raise AssertionError("a cache hit read the corpus")

    monkeypatch.setattr(D, "_file_documents", no_reading)
    tok, again = D.prepare_dataset(cfg)
    assert again == built and tok.vocab_size == 257
    (corpus / "d1.txt").write_text("an edited document " * 40)
    monkeypatch.setattr(D, "_file_documents", real)
    _, rebuilt = D.prepare_dataset(cfg)
    meta = json.loads((rebuilt / "meta.json").read_text())
    assert rebuilt != built and meta["bytes"] == 2 * len("document 0 " * 40) + 19 * 40


def test_a_cache_dir_inside_a_corpus_directory_is_not_corpus(tmp_path):
    """data.paths=[dir] with data.cache_dir under dir: the tokenized cache is not read back
    as text (the corpus, and so the cache key, stay the same from run to run)."""
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"hello corpus {name}\n" * 200)
    cfg = DataConfig(source="files", paths=[str(tmp_path)], tokenizer="byte",
                     cache_dir=str(tmp_path / ".cache"))
    D.prepare_dataset(cfg)
    assert any((tmp_path / ".cache").rglob("*.bin"))
    assert cfg.check_paths() == [tmp_path / f"{name}.txt" for name in "abc"]
