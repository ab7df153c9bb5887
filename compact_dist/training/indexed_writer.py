"""Tokenize a stream of documents into Megatron indexed datasets (`.bin`/`.idx`, megatron-core's
IndexedDatasetBuilder): the writer behind compact-preprocess (compact_dist/tools/preprocess.py)
and compact-train's `data.cache_dir` build of `stdlib` / `files` corpora
(compact_dist/training/data.py). Every document is its token ids followed by the tokenizer's
end-of-document id (Megatron's convention). Tokenizing runs in this process (workers <= 1) or
in a spawned pool, whose workers load the tokenizer once (`_init_worker`).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Iterator, Optional

import numpy as np

from compact_dist.training.tokenizer import load_tokenizer

_TOKENIZER = None  # this process's tokenizer (a pool worker's, or the writer's own)


def _init_worker(spec: str, eod_token: Optional[str]) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(spec, eod_token)


def _encode(batch: list[list[str]]) -> list[list[np.ndarray]]:
    """Per document, per key: token ids + EOD (int64)."""
    per_key = [_TOKENIZER.encode_batch([doc[k] for doc in batch]) for k in range(len(batch[0]))]
    eod = _TOKENIZER.eod
    return [[np.asarray(per_key[k][i] + [eod], dtype=np.int64) for k in range(len(per_key))]
            for i in range(len(batch))]


def _batches(docs: Iterator[tuple[list[str], int]], size: int
             ) -> Iterator[tuple[list[list[str]], int]]:
    batch, nbytes = [], 0
    for texts, n in docs:
        batch.append(texts)
        nbytes += n
        if len(batch) == size:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


def write_indexed(stream: Iterator[tuple[list[str], int]], tokenizer: str, prefixes: list[str],
                  workers: int = 1, batch_size: int = 256, eod_token: Optional[str] = None,
                  bar=None) -> dict:
    """Tokenize a document stream into one indexed dataset per prefix (megatron-core's
    IndexedDatasetBuilder); returns {"documents", "tokens"}.

    `stream` yields (texts, input bytes): texts[k] goes to prefixes[k] (ids + EOD). Bounded
    memory: batches of `batch_size` documents, at most 2 x workers batches in flight, written
    in order. `tokenizer`: a data.tokenizer spec (byte or a path). Files are written under a
    temporary name and renamed at the end (an error leaves no output). `bar`: a tqdm bar that
    counts the input bytes, or None.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    _init_worker(tokenizer, eod_token)  # this process tokenizes when workers <= 1
    dtype = DType.optimal_dtype(_TOKENIZER.vocab_size)
    tmp = [f"{p}.tmp-{os.getpid()}" for p in prefixes]
    builders = [IndexedDatasetBuilder(t + ".bin", dtype=dtype) for t in tmp]
    counts = {"documents": 0, "tokens": 0}

    def write(encoded: list[list[np.ndarray]], nbytes: int) -> None:
        for doc in encoded:
            for builder, ids in zip(builders, doc):
                builder.add_document(ids.astype(dtype), [len(ids)])
                counts["tokens"] += len(ids)
            counts["documents"] += 1
        if bar is not None:
            bar.update(nbytes)

    try:
        batches = _batches(stream, batch_size)
        if workers <= 1:
            for batch, nbytes in batches:
                write(_encode(batch), nbytes)
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers, _init_worker,
                                              (tokenizer, eod_token)) as pool:
                pending: deque = deque()
                for batch, nbytes in batches:
                    pending.append((pool.apply_async(_encode, (batch,)), nbytes))
                    if len(pending) >= 2 * workers:
                        result, n = pending.popleft()
                        write(result.get(), n)
                while pending:
                    result, n = pending.popleft()
                    write(result.get(), n)
        for builder, t, p in zip(builders, tmp, prefixes):
            builder.finalize(t + ".idx")
            os.replace(t + ".bin", p + ".bin")
            os.replace(t + ".idx", p + ".idx")
    finally:
        for t in tmp:
            for ext in (".bin", ".idx"):
                if os.path.exists(t + ext):
                    os.remove(t + ext)
    return counts
