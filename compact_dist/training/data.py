"""Training data for `compact-train`: real text -> tokenizer -> Megatron indexed dataset -> batches.

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

`source="indexed"` reads Megatron `.bin`/`.idx` prefixes and blends through megatron-core's
GPTDataset / BlendedDataset (compact_dist/training/indexed.py; tokenizers:
compact_dist/training/tokenizer.py). The stdlib / files sources go through this pipeline:
1. Corpus. `source="stdlib"`: the running interpreter's standard-library `.py` files (walked
   in sorted order; test directories and site-packages skipped). `source="files"`: the `paths`
   globs (sorted; a directory means the files under it); `.jsonl` files give one document
   per line (`obj[jsonl_key]`), any other file is one UTF-8 text document. Reading stops at `max_bytes` of UTF-8 text.
2. Tokenizer. A path (tokenizer.py), or `byte`: bytes 0..255 and end-of-document 256 (vocab
   257), or `bpe`: HF `tokenizers` byte-level BPE with `vocab_size` entries (id 0 is `<|endoftext|>`) trained on the corpus,
   or with `tokenizer_train_bytes` on a sample of it (`tokenizer_sample`: every k-th document,
   k = ceil(corpus bytes / budget), cut at the budget) that bounds the training time on large
   corpora; every document is still tokenized with it.
3. Documents are split into train/valid by a seeded document permutation (`valid_fraction`),
   tokenized, each followed by the end-of-document token, and written with megatron-core's
   `IndexedDatasetBuilder` to `<cache_dir>/<key>/{train,valid}.{bin,idx}` (+ `tokenizer.json`,
   `meta.json`); `key` hashes the settings and the corpus text. Global rank 0 builds into a
   temporary directory renamed into place (a killed build never leaves a partial dataset),
   the other ranks wait on `torch.distributed.barrier()` when a process group exists.
4. Samples (`TokenChunkDataset`, our own, over `IndexedDataset`): sample i is tokens
   [i s, i s + s + 1) of the split's concatenated token stream (chunks may span documents).
5. `BatchIterator`: global sample g reads sample perm_e[g mod N], perm_e a seeded permutation
   reshuffled each epoch e = g // N (seed + e). A micro-step consumes b * dp_size global
   samples; DP rank r takes [consumed + r b, consumed + (r + 1) b). So the ranks' batches,
   concatenated in rank order, are exactly the dp_size=1 stream with micro batch b * dp_size,
   and the state is one integer (`consumed_samples`).
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
from typing import Any, Callable, Iterator, Literal, NamedTuple, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compact_dist.training.tokenizer import EOD_TEXT, Tokenizer, load_tokenizer  # noqa: F401

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_FORMAT_VERSION = 1  # bump when the on-disk layout or tokenization changes


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
        input the prefixes, weights, token ids and splits (`indexed.check_indexed`)."""
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
        for pattern in self.paths:
            matched = sorted(  # a directory means the files under it
                f for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                for f in (sorted(q for q in Path(p).rglob("*") if q.is_file())
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


def read_corpus(cfg: DataConfig) -> list[str]:
    """Documents of the corpus in a deterministic order, at most `cfg.max_bytes` UTF-8 bytes
    in total (the last document is truncated to fit). Empty documents are dropped."""
    return read_corpus_truncated(cfg)[0]


def read_corpus_truncated(cfg: DataConfig) -> tuple[list[str], bool]:
    """(read_corpus, whether max_bytes cut text off)."""
    docs, total = [], 0
    for path in cfg.check_paths():
        for doc in _file_documents(path, cfg.jsonl_key):
            raw = doc.encode("utf-8")
            cut = total + len(raw) > cfg.max_bytes
            if cut:
                raw = raw[: cfg.max_bytes - total]
                doc = raw.decode("utf-8", errors="ignore")
            if doc:
                docs.append(doc)
                total += len(raw)
            if cut:  # the next document after the cap: cut to nothing but still a truncation
                return docs, True
    return docs, False


# ----------------------------------------------------------------------------- tokenizers

def tokenizer_sample(docs: list[str], max_bytes: Optional[int]) -> list[str]:
    """The documents BPE is trained on: all of them when `max_bytes` is None or not less than
    the corpus, else every k-th document (k = ceil(total / max_bytes), so the sample spreads
    over the whole corpus) until `max_bytes` UTF-8 bytes, the last one truncated to fit."""
    if max_bytes is None:
        return docs
    sizes = [len(d.encode("utf-8")) for d in docs]
    total = sum(sizes)
    if total <= max_bytes:
        return docs
    stride = -(-total // max_bytes)
    out, used = [], 0
    for i in range(0, len(docs), stride):
        if used + sizes[i] > max_bytes:
            doc = docs[i].encode("utf-8")[: max_bytes - used].decode("utf-8", errors="ignore")
            if doc:
                out.append(doc)
            break
        out.append(docs[i])
        used += sizes[i]
    return out


# ----------------------------------------------------------------------------- indexed dataset

def _rank() -> tuple[int, int]:
    """(global rank, local rank); (0, 0) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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


def _key(cfg: DataConfig, docs: list[str]) -> str:
    digest = _tokenizer_digest(cfg.tokenizer)
    h = hashlib.sha256(json.dumps({
        "version": _FORMAT_VERSION, "tokenizer": cfg.tokenizer if digest is None else digest,
        **({"eod_token": cfg.eod_token} if cfg.eod_token is not None else {}),
        "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None,
        "valid_fraction": cfg.valid_fraction, "seed": cfg.seed,
        # only when set, so the keys of datasets built without it stay valid
        **({"tokenizer_train_bytes": cfg.tokenizer_train_bytes}
           if cfg.tokenizer == "bpe" and cfg.tokenizer_train_bytes is not None else {}),
    }, sort_keys=True).encode())
    for doc in docs:
        raw = doc.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
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


def _build(cfg: DataConfig, docs: list[str], out: Path, truncated: bool = False) -> None:
    """Tokenizer + {train,valid}.{bin,idx} into `out` via a temporary directory and a rename."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta: dict[str, Any] = {}
        if cfg.tokenizer == "bpe":
            sample = tokenizer_sample(docs, cfg.tokenizer_train_bytes)
            tok = Tokenizer.train_bpe(sample, cfg.vocab_size)
            tok.save(tmp / "tokenizer.json")
            meta["tokenizer_train_documents"] = len(sample)
            meta["tokenizer_train_bytes"] = sum(len(d.encode("utf-8")) for d in sample)
        else:
            tok = load_tokenizer(cfg.tokenizer, cfg.eod_token)
        dtype = DType.optimal_dtype(tok.vocab_size)
        meta = {"tokenizer": cfg.tokenizer, "vocab_size": tok.vocab_size, "eod": tok.eod,
                "documents": len(docs), "truncated": truncated, **meta}
        for name, idx in zip(("train", "valid"),
                             split_documents(len(docs), cfg.valid_fraction, cfg.seed)):
            builder = IndexedDatasetBuilder(str(tmp / f"{name}.bin"), dtype=dtype)
            n_tokens = 0
            for ids in tok.encode_batch([docs[i] for i in idx]):
                ids.append(tok.eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                n_tokens += len(ids)
            builder.finalize(str(tmp / f"{name}.idx"))
            meta[f"{name}_documents"], meta[f"{name}_tokens"] = len(idx), n_tokens
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

    Every rank calls this; with a process group the others wait on a barrier. If the
    directory is still missing after it (a node-local `cache_dir` on another node), each
    node's local rank 0 builds its own copy (deterministic), then all meet again.
    """
    docs, truncated = read_corpus_truncated(cfg)
    out = Path(cfg.cache_dir) / _key(cfg, docs)
    rank, local_rank = _rank()
    if rank == 0 and not _complete(out):
        _build(cfg, docs, out, truncated)
    _barrier()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if local_rank == 0 and not _complete(out):
            _build(cfg, docs, out, truncated)
        _barrier()
    tok = (Tokenizer.load(out / "tokenizer.json") if cfg.tokenizer == "bpe"
           else load_tokenizer(cfg.tokenizer, cfg.eod_token))
    return tok, out


# ----------------------------------------------------------------------------- samples

class TokenChunkDataset:
    """Fixed-length samples over one split's concatenated token stream.

    `self[i]` is int64 ndarray[seq_length + 1]: stream tokens [i s, i s + s + 1).
    """

    def __init__(self, path_prefix: str | Path, seq_length: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.indexed = IndexedDataset(str(path_prefix))
        self.seq_length = seq_length
        self._starts = np.concatenate([[0], np.cumsum(self.indexed.sequence_lengths, dtype=np.int64)])
        self.num_tokens = int(self._starts[-1])
        self.num_samples = max(0, (self.num_tokens - 1) // seq_length)
        if self.num_samples == 0:
            raise ValueError(
                f"{path_prefix}: {self.num_tokens} tokens give no sample of seq_length+1="
                f"{seq_length + 1} tokens; raise data.max_bytes / valid_fraction or lower "
                "seq_length")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        start, need = i * self.seq_length, self.seq_length + 1
        doc = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while need:
            offset = start - int(self._starts[doc])
            n = min(need, int(self._starts[doc + 1]) - start)
            pieces.append(self.indexed.get(doc, offset=offset, length=n))
            start, need, doc = start + n, need - n, doc + 1
        return np.concatenate(pieces).astype(np.int64)


def _collate(samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """b samples of s+1 tokens -> tokens/labels/position_ids, each LongTensor[b, s]."""
    x = torch.from_numpy(np.stack(samples))
    b, s = x.shape[0], x.shape[1] - 1
    return {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
            "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous()}


class BatchIterator:
    """Infinite, resumable, data-parallel-aware iterator of training micro-batches.

    `next(it)` -> {"tokens", "labels", "position_ids"}: LongTensor[micro_batch_size, s]
    (labels[:, t] = tokens[:, t + 1] of the sample). Global sample g maps to
    dataset[perm(seed + g // N)[g % N]]; each call advances `consumed_samples` by
    micro_batch_size * dp_size and rank r reads its slice [r b, (r + 1) b) of that window.
    """

    def __init__(self, dataset: TokenChunkDataset, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234) -> None:
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad micro_batch_size={micro_batch_size} / dp_rank={dp_rank} / "
                             f"dp_size={dp_size}")
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_samples = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self.summary: list[str] = []  # the data summary lines (build_data sets them)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def sample_index(self, g: int) -> int:
        """Dataset index of global sample `g` (reshuffled every epoch with seed + epoch)."""
        n = len(self.dataset)
        epoch = g // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[g % n])

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        batch = _collate([self.dataset[self.sample_index(g)]
                          for g in range(first, first + self.micro_batch_size)])
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["consumed_samples"]` (global, so dp_size may differ on resume)."""
        for key, mine in (("seed", self.seed), ("num_samples", len(self.dataset))):
            if key in state and state[key] != mine:
                raise ValueError(f"data state has {key}={state[key]} but this run has {mine}: "
                                 "resuming would not reproduce the data order")
        self.consumed_samples = int(state["consumed_samples"])


def eval_batches(dataset: TokenChunkDataset, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, max_batches: Optional[int] = None
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed validation micro-batches (LongTensor[b, s] dicts), identical on every call.

    Samples are read in order; step k, rank r takes samples (k b dp + r b + j) mod N. Every
    rank yields the same count: max(1, N // (b dp)) capped by `max_batches`.
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
    train: BatchIterator
    valid_batches: Callable[..., Iterator[dict[str, torch.Tensor]]]


def build_data(cfg: DataConfig, seq_length: int, micro_batch_size: int, dp_rank: int = 0,
               dp_size: int = 1, train_samples: Optional[int] = None,
               valid_samples: Optional[int] = None) -> Data:
    """(tokenizer, train iterator, valid_batches(max_batches=None)) for this DP rank.

    The train iterator has `state_dict` / `load_state_dict` and `summary` (lines to print at
    start). train_samples / valid_samples: the samples the run reads (train.train_steps x
    global batch; eval_batches x micro batch x dp_size); indexed input needs them (its
    datasets are built for that many samples). Call on every rank (after the process group
    exists, if any; see `prepare_dataset`).
    """
    if cfg.source == "indexed":
        return _build_indexed(cfg, seq_length, micro_batch_size, dp_rank, dp_size,
                              train_samples, valid_samples)
    tok, path = prepare_dataset(cfg)
    train = TokenChunkDataset(path / "train", seq_length)
    valid = TokenChunkDataset(path / "valid", seq_length)

    def valid_batches(max_batches: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
        return eval_batches(valid, micro_batch_size, dp_rank, dp_size, max_batches)

    it = BatchIterator(train, micro_batch_size, dp_rank, dp_size, cfg.seed)
    it.summary = _corpus_summary(cfg, path, train, seq_length, train_samples)
    return Data(tok, it, valid_batches)


def _build_indexed(cfg: DataConfig, seq_length: int, micro_batch_size: int, dp_rank: int,
                   dp_size: int, train_samples: Optional[int],
                   valid_samples: Optional[int]) -> Data:
    from compact_dist.training.indexed import build_indexed, check_indexed

    if train_samples is None or valid_samples is None:
        raise ValueError("indexed input needs train_samples and valid_samples (the datasets "
                         "are built for the run's sample count)")
    tok = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    plan = check_indexed(cfg.paths, cfg.valid_paths, cfg.split, seq_length, tok.vocab_size,
                         cfg.tokenizer)
    data = build_indexed(plan, tok, seq_length, micro_batch_size, dp_rank, dp_size, cfg.seed,
                         cfg.cache_dir, train_samples, valid_samples, _collate,
                         f"tokenizer {cfg.tokenizer} (vocab {tok.vocab_size}, eod {tok.eod})")

    def valid_batches(max_batches: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
        return eval_batches(data.valid, micro_batch_size, dp_rank, dp_size, max_batches)

    return Data(tok, data.train, valid_batches)


def _corpus_summary(cfg: DataConfig, path: Path, train: "TokenChunkDataset", seq_length: int,
                    train_samples: Optional[int]) -> list[str]:
    """The data summary of the stdlib / files sources (meta.json of the cached build)."""
    meta = json.loads((path / "meta.json").read_text())
    lines = [f"data: {cfg.source}, tokenizer {cfg.tokenizer} (vocab {meta['vocab_size']}, eod "
             f"{meta['eod']}), cached in {path}"]
    for name in ("train", "valid"):
        lines.append(f"  {name}: {meta[name + '_documents']:,} documents, "
                     f"{meta[name + '_tokens']:,} tokens")
    if train_samples is not None:
        epochs = train_samples / len(train)
        lines.append(f"  this run: {train_samples:,} samples x {seq_length} = "
                     f"{train_samples * seq_length:,} tokens, {epochs:.2f} epochs")
        if epochs > 1:
            lines.append(f"warning: the run repeats data: {epochs:.2f} epochs of the training "
                         "split")
    if meta.get("truncated"):
        lines.append(f"warning: data.max_bytes={cfg.max_bytes:,} truncated the corpus (it has "
                     "more text): raise it to train on all of it")
    return lines
