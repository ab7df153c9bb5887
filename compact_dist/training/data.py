"""Training data for `compact-train`: text or Megatron indexed prefixes -> GPT samples -> batches.

Entry point used by the trainer::

    cfg = DataConfig(...)                 # validated at load (pydantic, ValueError on bad values)
    cfg.check(seq_length)                 # before any process group: files, tokenizer, prefixes
    tokenizer, train_iter, valid_batches = build_data(cfg, seq_length, micro_batch_size,
                                                      dp_rank, dp_size, train_samples,
                                                      valid_samples)
    train_iter.summary                    # the data summary lines (compact-train prints them)
    batch = next(train_iter)              # {"tokens", "labels", "position_ids"}: LongTensor[b, s]
    state = train_iter.state_dict()       # {"consumed_samples": int, ...}; put in the checkpoint
    train_iter.load_state_dict(state)     # the next batches equal those of an uninterrupted run
    for batch in valid_batches(max_batches):   # same fixed batches on every call
        ...

with b = micro_batch_size and s = seq_length.

One data path: every source ends as Megatron `.bin`/`.idx` prefixes read by megatron-core's
GPTDataset through compact_dist/training/indexed.py (sample order, DP slicing, resume, summary;
tokenizers: compact_dist/training/tokenizer.py). `source="indexed"` names the prefixes. The
stdlib / files sources are first tokenized once into `data.cache_dir`:
1. Corpus (`Corpus`, streamed: no rank holds it in memory). `source="stdlib"`: the running
   interpreter's standard-library `.py` files (walked in sorted order; test directories and
   site-packages skipped). `source="files"`: the `paths` globs (sorted; a directory means the
   files under it); `.jsonl` files give one document per line (`obj[jsonl_key]`), any other
   file is one UTF-8 text document. Reading stops at `max_bytes` of UTF-8 text.
2. Tokenizer. A path (tokenizer.py), or `byte`: bytes 0..255 and end-of-document 256 (vocab
   257), or `bpe`: HF `tokenizers` byte-level BPE with `vocab_size` entries (id 0 is
   `<|endoftext|>`) trained on the corpus, or with `tokenizer_train_bytes` on a sample of it
   (`tokenizer_sample`: every k-th document, k = ceil(corpus bytes / budget), cut at the
   budget) that bounds the training time on large corpora; every document is still tokenized.
3. Documents are split into train/valid by a seeded document permutation (`valid_fraction`)
   and written by compact-preprocess's writer (`indexed_writer.write_indexed`, megatron-core's
   IndexedDatasetBuilder, each document followed by the end-of-document token) to
   `<cache_dir>/<key>/{train,valid}.{bin,idx}` (+ `tokenizer.json` for bpe, `meta.json`). `key`
   hashes the settings, the tokenizer's files and each corpus file's path, size and mtime.
   Global rank 0 builds into a temporary directory renamed into place (a killed build never
   leaves a partial dataset); the other ranks wait for it (and raise its error, if any;
   `cache_dir` must be a directory every node sees, as for the index caches).
4. The two prefixes are then read like `source: indexed` with `paths: [<key>/train]`,
   `valid_paths: [<key>/valid]`: GPTDataset samples of s + 1 tokens spanning documents,
   shuffled by megatron-core for `seed`; DP rank r of a micro-step reads global samples
   [consumed + r b, consumed + (r + 1) b); the state is `consumed_samples`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, NamedTuple, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compact_dist.training.tokenizer import EOD_TEXT, Tokenizer, load_tokenizer  # noqa: F401

if TYPE_CHECKING:
    from compact_dist.training.indexed import GlobalSampleIterator

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_FORMAT_VERSION = 2  # bump when the on-disk layout or tokenization changes


class DataConfig(BaseModel):
    """Data settings (the `data:` section of a train config); bad values raise ValueError."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["stdlib", "files", "indexed"] = "stdlib"
    paths: list[str] = []
    valid_paths: list[str] = []    # indexed: a separate validation blend (instead of split)
    split: Optional[str] = None    # indexed: train,valid,test weights; None: 98,2,0
    jsonl_key: str = Field("text", min_length=1)
    tokenizer: str = Field("bpe", min_length=1)  # byte | bpe | path (tokenizer.py)
    eod_token: Optional[str] = None  # path tokenizers: the end-of-document token's text
    vocab_size: int = Field(2048, ge=260)
    max_bytes: int = Field(8_000_000, ge=1)
    tokenizer_train_bytes: Optional[int] = Field(None, ge=1)  # BPE sample budget; None: all
    valid_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    cache_dir: str = ".cache/compact_dist"
    seed: int = Field(1234, ge=0)

    @field_validator("paths", "valid_paths", mode="before")
    @classmethod
    def _blend_words(cls, value):
        """A string is split on whitespace (`data.paths="0.3 /d/a 0.7 /d/b"`); numbers in a
        YAML list are the weights of a blend."""
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                    for v in value]
        return value

    @model_validator(mode="after")
    def _paths_for_source(self) -> "DataConfig":
        if self.source == "files" and not self.paths:
            raise ValueError("source='files' needs a non-empty 'paths' list of file globs")
        if self.source == "stdlib" and self.paths:
            raise ValueError("'paths' is only used with source='files' (source is 'stdlib')")
        if self.source == "indexed":
            from compact_dist.training.indexed import parse_blend, split_matrix

            if not self.paths:
                raise ValueError("source='indexed' needs 'paths': dataset prefixes, optionally "
                                 "as weight prefix pairs (Megatron-LM's --data-path)")
            if self.tokenizer == "bpe":
                raise ValueError("source='indexed' needs the tokenizer the data was made with: "
                                 "set 'tokenizer' to its tokenizer.json, directory or .model")
            if self.valid_paths and self.split is not None:
                raise ValueError("set only one of 'split' and 'valid_paths'")
            parse_blend(self.paths, "paths")  # the error line's "data: " names the section
            if self.valid_paths:
                parse_blend(self.valid_paths, "valid_paths")
            if self.split is not None:
                split_matrix(self.split, "split")
        else:
            for key in ("valid_paths", "split"):
                if getattr(self, key):
                    raise ValueError(f"'{key}' is only used with source='indexed' "
                                     f"(source is {self.source!r})")
        return self

    def check(self, seq_length: Optional[int] = None) -> None:
        """Every data check that touches only the filesystem (before any process group): the
        corpus files, the tokenizer (loads, has an end-of-document token), and for indexed
        input the prefixes, weights, token ids and splits (`indexed.check_indexed`); and that
        cache_dir is a writable directory (created if missing)."""
        from compact_dist.training.checkpoint_dir import check_writable

        check_writable(Path(os.path.expanduser(self.cache_dir)), "data.cache_dir", ValueError)
        if self.source != "indexed":
            self.check_paths()
            if self.tokenizer not in ("byte", "bpe"):
                load_tokenizer(self.tokenizer, self.eod_token)
            return
        from compact_dist.training.indexed import check_indexed

        tok = load_tokenizer(self.tokenizer, self.eod_token)
        check_indexed(self.paths, self.valid_paths, self.split, seq_length, tok.vocab_size,
                      self.tokenizer)

    def check_paths(self) -> list[Path]:
        """Files the corpus is read from, in order (a directory: the files under it, sorted);
        ValueError if a glob matches no file.

        Touches only the filesystem, so it runs before any process group exists.
        """
        if self.source == "indexed":
            return []
        if self.source == "stdlib":
            return list(_stdlib_files())
        files: list[Path] = []
        cache = Path(os.path.expanduser(self.cache_dir)).resolve()

        def corpus_file(q: Path) -> bool:  # not the tokenized cache, if it lies under a path
            return q.is_file() and cache not in q.resolve().parents

        for pattern in self.paths:
            matched = sorted(  # a directory means the files under it
                f for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                for f in (sorted(q for q in Path(p).rglob("*") if corpus_file(q))
                          if os.path.isdir(p) else [Path(p)])
            )
            if not matched:
                raise ValueError(f"no files match data.paths entry {pattern!r} "
                                 f"(relative to {os.getcwd()})")
            files.extend(m for m in matched if m not in files)
        return files


# ----------------------------------------------------------------------------- corpus

def _stdlib_files() -> Iterator[Path]:
    """The interpreter's stdlib .py files: directory walk in sorted order, tests skipped."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath, name)


def _file_documents(path: Path, jsonl_key: str) -> Iterator[str]:
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(jsonl_key), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string "
                                 f"field {jsonl_key!r} (data.jsonl_key)")
            yield obj[jsonl_key]


class Corpus:
    """The corpus documents in a deterministic order, streamed (one document in memory at a
    time), at most `cfg.max_bytes` UTF-8 bytes in total (the last document is cut to fit);
    empty documents are dropped. After a full iteration `truncated` says whether max_bytes
    cut text off."""

    def __init__(self, cfg: DataConfig, files: Optional[list[Path]] = None) -> None:
        self.cfg = cfg
        self.files = cfg.check_paths() if files is None else files
        self.truncated = False

    def __iter__(self) -> Iterator[str]:
        total, cap = 0, self.cfg.max_bytes
        for path in self.files:
            for doc in _file_documents(path, self.cfg.jsonl_key):
                raw = doc.encode("utf-8")
                cut = total + len(raw) > cap
                if cut:
                    raw = raw[: cap - total]
                    doc = raw.decode("utf-8", errors="ignore")
                if doc:
                    yield doc
                    total += len(raw)
                if cut:  # the next document after the cap: cut to nothing, still a truncation
                    self.truncated = True
                    return


def read_corpus(cfg: DataConfig) -> list[str]:
    """All documents of `Corpus(cfg)` as a list (for tools and tests; training streams)."""
    return list(Corpus(cfg))


# ----------------------------------------------------------------------------- tokenizers

def tokenizer_sample(docs: Iterable[str], sizes: Sequence[int],
                     max_bytes: Optional[int]) -> Iterator[str]:
    """The documents BPE is trained on, streamed from `docs` (whose UTF-8 sizes are `sizes`):
    all of them when `max_bytes` is None or not less than their total, else every k-th
    document (k = ceil(total / max_bytes), so the sample spreads over the whole corpus) until
    `max_bytes` UTF-8 bytes, the last one truncated to fit."""
    total = int(np.sum(sizes, dtype=np.int64))
    if max_bytes is None or total <= max_bytes:
        yield from docs
        return
    stride = -(-total // max_bytes)
    used = 0
    for i, doc in enumerate(docs):
        if i % stride:
            continue
        if used + sizes[i] > max_bytes:
            doc = doc.encode("utf-8")[: max_bytes - used].decode("utf-8", errors="ignore")
            if doc:
                yield doc
            return
        yield doc
        used += sizes[i]


# ----------------------------------------------------------------------------- tokenized cache

def _rank() -> int:
    """Global rank; 0 without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _from_rank0(error: Optional[str], key: str) -> tuple[Optional[str], list[str]]:
    """Rank 0's build error (None: built) and every rank's cache key, on every rank; the
    others wait here for rank 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        keys: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(keys, key)
        return box[0], keys
    return error, [key]


def _tokenizer_digest(spec: str) -> Optional[str]:
    """Hash of a path tokenizer's files (so a changed tokenizer rebuilds the cache)."""
    if spec in ("byte", "bpe"):
        return None
    path = Path(spec).expanduser()
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _key(cfg: DataConfig, files: list[Path]) -> str:
    """Cache key: the settings that shape the tokenized corpus, the tokenizer's files, and each
    corpus file's path, size and modification time (cheap on every rank: no file is read)."""
    digest = _tokenizer_digest(cfg.tokenizer)
    h = hashlib.sha256(json.dumps({
        "version": _FORMAT_VERSION, "tokenizer": cfg.tokenizer if digest is None else digest,
        "eod_token": cfg.eod_token, "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None,
        "tokenizer_train_bytes": cfg.tokenizer_train_bytes if cfg.tokenizer == "bpe" else None,
        "valid_fraction": cfg.valid_fraction, "seed": cfg.seed, "max_bytes": cfg.max_bytes,
        "jsonl_key": cfg.jsonl_key,
    }, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:16]


def _complete(path: Path) -> bool:
    return (path / "meta.json").is_file()  # written last, before the rename


def split_documents(num_docs: int, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, valid) document indices, each in corpus order; both non-empty."""
    if num_docs < 2:
        raise ValueError(f"the corpus has {num_docs} document(s); a train/valid split needs >= 2")
    n_valid = min(num_docs - 1, max(1, round(valid_fraction * num_docs)))
    valid = set(np.random.default_rng(seed).permutation(num_docs)[:n_valid].tolist())
    return [i for i in range(num_docs) if i not in valid], sorted(valid)


def _build(cfg: DataConfig, files: list[Path], out: Path) -> None:
    """Tokenizer + {train,valid}.{bin,idx} into `out` via a temporary directory and a rename.

    Streams the corpus: one pass for the document sizes (the split and the BPE sample need
    the count), one to train BPE (bpe only), one per split to tokenize (write_indexed)."""
    from compact_dist.training.indexed_writer import write_indexed

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        corpus = Corpus(cfg, files)
        sizes = np.fromiter((len(d.encode("utf-8")) for d in corpus), dtype=np.int64)
        meta: dict[str, Any] = {"tokenizer": cfg.tokenizer, "documents": len(sizes),
                                "bytes": int(sizes.sum()), "truncated": corpus.truncated}
        spec, eod_token = cfg.tokenizer, cfg.eod_token
        if cfg.tokenizer == "bpe":
            counted = {"documents": 0, "bytes": 0}

            def sample() -> Iterator[str]:
                for doc in tokenizer_sample(Corpus(cfg, files), sizes, cfg.tokenizer_train_bytes):
                    counted["documents"] += 1
                    counted["bytes"] += len(doc.encode("utf-8"))
                    yield doc

            spec, eod_token = str(tmp / "tokenizer.json"), None
            Tokenizer.train_bpe(sample(), cfg.vocab_size).save(spec)
            meta["tokenizer_train_documents"] = counted["documents"]
            meta["tokenizer_train_bytes"] = counted["bytes"]
        tok = load_tokenizer(spec, eod_token)
        meta.update(vocab_size=tok.vocab_size, eod=tok.eod)
        valid = np.zeros(len(sizes), dtype=bool)
        valid[split_documents(len(sizes), cfg.valid_fraction, cfg.seed)[1]] = True
        for name, in_split in (("train", False), ("valid", True)):
            stream = (([doc], size) for doc, size, v in zip(Corpus(cfg, files), sizes, valid)
                      if v == in_split)
            counts = write_indexed(stream, spec, [str(tmp / name)], eod_token=eod_token)
            meta[f"{name}_documents"], meta[f"{name}_tokens"] = counts["documents"], counts["tokens"]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, out)
        except OSError:
            if not _complete(out):  # lost a race to a concurrent, finished build: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_dataset(cfg: DataConfig) -> tuple[Tokenizer, Path]:
    """Build (global rank 0) or reuse the tokenized corpus; returns (tokenizer, directory).

    Every rank calls this; with a process group the others wait for rank 0, then find the
    directory (in a `cache_dir` every node sees) or raise. A build error (a malformed JSONL
    line, too few documents) raises on every rank, not only on rank 0.
    """
    files = cfg.check_paths()
    key = _key(cfg, files)
    out = Path(cfg.cache_dir) / key
    error = None
    if _rank() == 0 and not _complete(out):
        try:
            _build(cfg, files, out)
        except Exception as err:
            error = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            _from_rank0(error, key)
            raise
    error, keys = _from_rank0(error, key)
    if error is not None:
        raise ValueError(f"rank 0 could not tokenize the corpus: {error}")
    other = sorted(r for r, k in enumerate(keys) if k != keys[0])
    if other:  # e.g. node-local copies of the corpus that differ in size or time
        raise ValueError(
            f"rank(s) {', '.join(map(str, other))} see other corpus or tokenizer files than rank "
            f"0 (cache keys {sorted(set(keys))}): data.paths and data.tokenizer must name the "
            "same files, with the same size and modification time, on every node")
    if not _complete(out):
        raise RuntimeError(f"rank {_rank()}: {out} is missing after rank 0 built it: "
                           "data.cache_dir must be a directory every node sees")
    tok = (Tokenizer.load(out / "tokenizer.json") if cfg.tokenizer == "bpe"
           else load_tokenizer(cfg.tokenizer, cfg.eod_token))
    return tok, out


# ----------------------------------------------------------------------------- batches

def _collate(samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """b samples of s+1 tokens -> tokens/labels/position_ids, each LongTensor[b, s]."""
    x = torch.from_numpy(np.stack(samples))
    b, s = x.shape[0], x.shape[1] - 1
    return {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
            "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous()}


def eval_batches(dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 max_batches: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed validation micro-batches (LongTensor[b, s] dicts), identical on every call.

    `dataset[i]`: int64 ndarray[s + 1]. Samples are read in order; step k, rank r takes
    samples (k b dp + r b + j) mod N. Every rank yields the same count: max(1, N // (b dp))
    capped by `max_batches`.
    """
    per_step = micro_batch_size * dp_size
    steps = max(1, len(dataset) // per_step)
    if max_batches is not None:
        steps = min(steps, max_batches)
    for k in range(steps):
        first = k * per_step + dp_rank * micro_batch_size
        yield _collate([dataset[g % len(dataset)] for g in range(first, first + micro_batch_size)])


class Data(NamedTuple):
    tokenizer: Tokenizer
    train: GlobalSampleIterator
    valid_batches: Callable[..., Iterator[dict[str, torch.Tensor]]]


def build_data(cfg: DataConfig, seq_length: int, micro_batch_size: int, dp_rank: int = 0,
               dp_size: int = 1, train_samples: Optional[int] = None,
               valid_samples: Optional[int] = None) -> Data:
    """(tokenizer, train iterator, valid_batches(max_batches=None)) for this DP rank.

    The train iterator has `state_dict` / `load_state_dict` and `summary` (lines to print at
    start). train_samples / valid_samples: the samples the run reads (train.train_steps x
    global batch; eval_batches x micro batch x dp_size); the datasets are built for that
    many samples. Call on every rank (after the process group exists, if any).
    """
    from compact_dist.training.indexed import build_indexed, check_indexed

    if train_samples is None or valid_samples is None:
        raise ValueError("build_data needs train_samples and valid_samples (the datasets are "
                         "built for the run's sample count)")
    if cfg.source == "indexed":
        tok = load_tokenizer(cfg.tokenizer, cfg.eod_token)
        plan = check_indexed(cfg.paths, cfg.valid_paths, cfg.split, seq_length,
                             tok.vocab_size, cfg.tokenizer)
        header = (f"data: indexed, tokenizer {cfg.tokenizer} (vocab {tok.vocab_size}, eod "
                  f"{tok.eod}), " + (f"split {plan.split}" if plan.split
                                     else "separate validation blend"))
        warnings: list[str] = []
    else:
        tok, path = prepare_dataset(cfg)
        meta = json.loads((path / "meta.json").read_text())
        for name in ("train", "valid"):
            if meta[f"{name}_tokens"] < seq_length + 1:
                raise ValueError(
                    f"data: the {name} split of the corpus has {meta[name + '_tokens']} tokens, "
                    f"not one sample of model.seq_length+1={seq_length + 1}: raise "
                    "data.max_bytes / data.valid_fraction or lower model.seq_length")
        plan = check_indexed([str(path / "train")], [str(path / "valid")], None, seq_length,
                             tok.vocab_size, cfg.tokenizer)
        header = (f"data: {cfg.source}, tokenizer {cfg.tokenizer} (vocab {tok.vocab_size}, eod "
                  f"{tok.eod}), {meta['documents']:,} documents split by "
                  f"data.valid_fraction={cfg.valid_fraction}, tokenized in {path}")
        warnings = [f"warning: data.max_bytes={cfg.max_bytes:,} truncated the corpus (it has "
                    "more text): raise it to train on all of it"] if meta["truncated"] else []
    data = build_indexed(plan, tok, seq_length, micro_batch_size, dp_rank, dp_size, cfg.seed,
                         cfg.cache_dir, train_samples, valid_samples, _collate, header)
    data.train.summary += warnings

    def valid_batches(max_batches: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
        return eval_batches(data.valid, micro_batch_size, dp_rank, dp_size, max_batches)

    return Data(tok, data.train, valid_batches)
