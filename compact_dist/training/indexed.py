"""Indexed input (`data.source: indexed`): Megatron `.bin`/`.idx` prefixes -> GPT samples.

A blend is Megatron-LM's `--data-path`: prefixes only (`[/d/a, /d/b]`, weighted by size) or
weight/prefix pairs (`[0.3, /d/a, 0.7, /d/b]`). `data.paths` is the blend that `data.split`
("98,2,0": train, valid, test weights) divides by documents, or, with `data.valid_paths`, the
training blend and `data.valid_paths` the validation one. megatron-core builds everything:
`IndexedDataset` (memory-mapped `.bin`/`.idx`), `GPTDataset` (document / sample / shuffle
indices over `num_samples`, as many epochs as that needs, seeded by `data.seed`) and
`BlendedDataset` (weighted interleaving), through `BlendedMegatronDatasetBuilder`, whose
compiled helpers ship in the wheel. Their index caches go to `data.cache_dir`: global rank 0
builds them, the others wait on a barrier and load them (the directory must be one every
node sees, like Megatron-LM's --data-cache-path).

Sample order: global sample g of the training split is `train[g]` (already shuffled by
megatron-core for the seed); a micro-step consumes b * dp_size samples and DP rank r reads
[consumed + r b, consumed + (r + 1) b). The order depends on the seed, the blend, the split,
seq_length and the run's total sample count (train_steps x global batch), not on dp_size; the
state is `consumed_samples`.

`check_indexed` does every check that needs only the filesystem (before any process group);
`build_indexed` builds the datasets (every rank, after the process group exists).
"""

from __future__ import annotations

import hashlib

import math
import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch

DEFAULT_SPLIT = "98,2,0"
Blend = tuple[list[str], Optional[list[float]]]


def parse_blend(entries: list[str], key: str) -> Blend:
    """(prefixes, weights or None) of a Megatron-LM --data-path list; ValueError naming `key`
    when weights do not parse or are not paired with prefixes."""
    if not entries:
        raise ValueError(f"{key} is empty: give dataset prefixes (path/to/name for "
                         "name.bin + name.idx), optionally as weight prefix pairs")

    def number(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None

    numbers = [number(e) for e in entries]
    if all(n is None for n in numbers):
        return list(entries), None
    if len(entries) % 2 or any(n is None for n in numbers[0::2]):
        bad = next((e for e, n in zip(entries[0::2], numbers[0::2]) if n is None),
                   entries[-1])
        raise ValueError(f"{key}: weights that do not parse near {bad!r}: expected weight "
                         "prefix pairs (0.3 /d/a 0.7 /d/b) or prefixes only (/d/a /d/b)")
    weights = numbers[0::2]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{key}: weights {entries[0::2]} must be finite, >= 0 and not all 0")
    return list(entries[1::2]), weights


def split_matrix(split: str, key: str = "data.split") -> list[Optional[tuple[float, float]]]:
    """megatron-core's (begin, end) fraction of the documents per split (train, valid, test),
    None for an empty split; ValueError naming data.split when it does not parse."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"{key}={split!r}: expected up to 3 non-negative weights of the "
                         "train, valid and test splits, e.g. 98,2,0")
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


class PrefixInfo(NamedTuple):
    prefix: str
    documents: int
    tokens: int
    dtype: type


def read_prefix(prefix: str, key: str) -> PrefixInfo:
    """Opens the prefix's .idx (memory-mapped) and checks it against the .bin's size."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    if not idx.exists() and not bin_.exists():
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f" (a prefix has no extension: {prefix[:-4]})"
        raise ValueError(f"{key}: no dataset at prefix {prefix!r}: neither {bin_} nor {idx} "
                         f"exists{hint}")
    for have, missing in ((bin_, idx), (idx, bin_)):
        if not missing.is_file():
            raise ValueError(f"{key}: prefix {prefix!r} has {have.name} but no {missing.name}")
    try:
        ds = IndexedDataset(prefix)
    except Exception as err:
        raise ValueError(f"{key}: {idx} is not a Megatron index file "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                         ) from None
    index = ds.index
    n = len(index)
    dtype = index.dtype
    size = bin_.stat().st_size
    end = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * \
        np.dtype(dtype).itemsize if n else 0
    if size != end:
        raise ValueError(f"{key}: {bin_} has {size} bytes but {idx.name} indexes {end}: the "
                         "pair is truncated or from different runs")
    return PrefixInfo(prefix, n, end // np.dtype(dtype).itemsize, dtype)


def split_tokens(prefix: str, bounds: Optional[tuple[float, float]]) -> tuple[int, int]:
    """(documents, tokens) of the prefix's sequences in one split (megatron-core's rounding)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if bounds is None:
        return 0, 0
    index = IndexedDataset(prefix).index
    n = len(index)
    beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
    if end <= beg:
        return 0, 0
    item = np.dtype(index.dtype).itemsize
    first = int(index.sequence_pointers[beg])
    last = int(index.sequence_pointers[end - 1]) + int(index.sequence_lengths[end - 1]) * item
    return end - beg, (last - first) // item


def check_token_ids(info: PrefixInfo, vocab_size: int, spec: str, key: str,
                    sample_tokens: int = 1 << 20) -> None:
    """The token ids this tokenizer can have: the file's dtype and the first `sample_tokens`
    ids of the .bin (a prefix made with another tokenizer is refused)."""
    limit = np.iinfo(info.dtype).max + 1
    if vocab_size > limit:
        raise ValueError(f"{key}: {info.prefix}.bin stores {np.dtype(info.dtype).name} ids "
                         f"(< {limit}) but data.tokenizer={spec!r} has {vocab_size} tokens: "
                         "the prefix was made with another tokenizer")
    if info.tokens == 0:
        return
    ids = np.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r",
                    shape=(min(info.tokens, sample_tokens),))
    top = int(ids.max())
    if top >= vocab_size:
        raise ValueError(f"{key}: {info.prefix}.bin holds token id {top}, beyond the "
                         f"vocabulary of data.tokenizer={spec!r} ({vocab_size} tokens, which "
                         "size the model's embedding): the prefix was made with another "
                         "tokenizer")


class SplitPlan(NamedTuple):
    """What check_indexed found: per split, the blend and its per-prefix sizes."""
    train: Blend
    valid: Blend
    split: Optional[str]
    train_sizes: list[tuple[int, int]]   # (documents, tokens) per train prefix
    valid_sizes: list[tuple[int, int]]


def check_indexed(paths: list[str], valid_paths: list[str], split: Optional[str],
                  seq_length: Optional[int], vocab_size: int, tokenizer: str) -> SplitPlan:
    """Everything about an indexed blend that the filesystem can tell (no process group):
    prefixes exist with both files, weights parse, ids fit the tokenizer, every prefix gives
    each split at least one sample of seq_length + 1 tokens."""
    train = parse_blend(paths, "data.paths")
    valid = parse_blend(valid_paths, "data.valid_paths") if valid_paths else train
    matrix = split_matrix(split or DEFAULT_SPLIT) if not valid_paths else None
    infos = {}
    for key, (prefixes, _) in (("data.paths", train), ("data.valid_paths", valid)):
        for prefix in prefixes:
            if prefix not in infos:
                infos[prefix] = read_prefix(prefix, key)
                check_token_ids(infos[prefix], vocab_size, tokenizer, key)
    sizes = {}
    for name, blend, bounds in (("train", train, matrix[0] if matrix else (0.0, 1.0)),
                                ("valid", valid, matrix[1] if matrix else (0.0, 1.0))):
        key = "data.valid_paths" if name == "valid" and valid_paths else "data.paths"
        sizes[name] = [split_tokens(p, bounds) for p in blend[0]]
        weights = blend[1] or [1.0] * len(blend[0])
        for prefix, weight, (docs, tokens) in zip(blend[0], weights, sizes[name]):
            need = (seq_length or 0) + 1
            if weight > 0 and tokens < need:
                where = f"data.split={split or DEFAULT_SPLIT!r}" if matrix else key
                raise ValueError(
                    f"{key}: prefix {prefix!r} gives the {name} split ({where}) {docs} "
                    f"documents, {tokens} tokens: an empty split (one sample needs "
                    f"model.seq_length+1={need} tokens)")
    return SplitPlan(train, valid, None if valid_paths else (split or DEFAULT_SPLIT),
                     sizes["train"], sizes["valid"])


# ----------------------------------------------------------------------------- datasets

def gpt_datasets(plan: SplitPlan, tokenizer, seq_length: int, seed: int, cache_dir: str,
                 train_samples: int, valid_samples: int):
    """(train, valid) megatron-core datasets (GPTDataset or BlendedDataset) of at least the
    given sample counts. Call on every rank; rank 0 builds the index caches first."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if not torch.distributed.is_initialized() and max(len(plan.train[0]),
                                                      len(plan.valid[0])) > 1:
        raise RuntimeError("megatron-core's BlendedDataset needs a process group "
                           "(torch.distributed.init_process_group; compact-train has one)")
    blends = dict(blend=plan.train, split=plan.split) if plan.split else dict(
        blend_per_split=[plan.train, plan.valid, None])
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, path_to_cache=os.path.abspath(cache_dir),
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, **blends)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config)
    # The rank that built the indices holds them in memory (O(corpus tokens / seq_length));
    # built again, every dataset loads them memory-mapped from the cache, like the other ranks.
    del builder.build()[:]
    train, valid, _ = builder.build()
    return train, valid


class Samples:
    """A megatron-core dataset as int64 ndarray[seq_length + 1] samples (tokens, then the
    last label), for data.py's collate."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> np.ndarray:
        item = self.dataset[i]
        return torch.cat([item["tokens"], item["labels"][-1:]]).numpy()


class GlobalSampleIterator:
    """Infinite over steps of the run, resumable, data-parallel-aware training micro-batches.

    `next(it)` -> {"tokens", "labels", "position_ids"}: LongTensor[micro_batch_size, s];
    global sample g is samples[g]; each call advances `consumed_samples` by
    micro_batch_size * dp_size and rank r reads [consumed + r b, consumed + (r + 1) b).
    """

    def __init__(self, samples: Samples, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, collate: Callable) -> None:
        self.samples, self.micro_batch_size = samples, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.collate = collate
        self.consumed_samples = 0
        self.summary: list[str] = []

    def __iter__(self) -> "GlobalSampleIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        if self.consumed_samples + self.micro_batch_size * self.dp_size > len(self.samples):
            raise RuntimeError(f"the training split was built for {len(self.samples)} samples "
                               "(train.train_steps x global batch); the run asks for more")
        batch = self.collate([self.samples[g] for g in range(first, first +
                                                             self.micro_batch_size)])
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    ORDER_PROBE = 16  # samples before and after `consumed_samples` the order digest reads

    def order_digest(self, consumed: int) -> str:
        """sha1 of the global samples around `consumed` ([consumed - 16, consumed + 16),
        clipped to the split): equal digests mean this run reads the same samples there.
        megatron-core's GPTDataset order depends on the run's total samples (its number of
        epochs and whether the last one is shuffled apart), not only on data.seed."""
        digest = hashlib.sha1()
        for g in range(max(0, consumed - self.ORDER_PROBE),
                       min(len(self.samples), consumed + self.ORDER_PROBE)):
            digest.update(np.ascontiguousarray(self.samples[g], dtype=np.int64).tobytes())
        return digest.hexdigest()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "num_samples": len(self.samples),
                "order_digest": self.order_digest(self.consumed_samples)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["consumed_samples"]` (global, so dp_size may differ on resume).
        ValueError when this run's sample order differs from the checkpointed run's around
        that point (another data.seed, blend, or a train.train_steps / global batch that
        changes the dataset's epochs), instead of reading other samples silently."""
        consumed = int(state["consumed_samples"])
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"data state has seed={state['seed']} but this run has "
                             f"{self.seed}: keep data.seed of the checkpointed run")
        if "order_digest" in state:
            same = state["order_digest"] == self.order_digest(consumed)
        else:  # checkpoints before the digest: the length is what they recorded
            same = state.get("num_samples", len(self.samples)) == len(self.samples)
        if not same:
            raise ValueError(
                f"this run's training samples around sample {consumed} differ from the "
                "checkpointed run's: megatron-core's GPTDataset order depends on the run's total "
                "samples (train.train_steps x global batch: its epochs), data.seed and the "
                "blend; keep those of the checkpointed run (train.train_steps may change only "
                "while the order stays the same)")
        self.consumed_samples = consumed


# ----------------------------------------------------------------------------- summary

def _epochs(dataset, plan: SplitPlan, seq_length: int, train_samples: int) -> list[float]:
    """Epochs of each training prefix that the first `train_samples` samples read."""
    per_epoch = [max(1, (t - 1) // seq_length) for _, t in plan.train_sizes]
    if len(plan.train[0]) == 1:
        return [train_samples / per_epoch[0]]
    drawn = np.bincount(np.asarray(dataset.dataset_index[:train_samples]),
                        minlength=len(per_epoch))
    return [int(d) / e for d, e in zip(drawn, per_epoch)]


def summary_lines(plan: SplitPlan, train_dataset, seq_length: int, train_samples: int,
                  header: str) -> list[str]:
    """The data summary compact-train prints at start (rank 0; `header` first) and its
    warnings."""
    lines = [header]
    epochs = _epochs(train_dataset, plan, seq_length, train_samples)
    for name, blend, sizes in (("train", plan.train, plan.train_sizes),
                               ("valid", plan.valid, plan.valid_sizes)):
        weights = blend[1] or [t for _, t in sizes]
        total = sum(weights)
        for k, (prefix, (docs, tokens)) in enumerate(zip(blend[0], sizes)):
            extra = f", {epochs[k]:.2f} epochs this run" if name == "train" else ""
            lines.append(f"  {name} {prefix}: weight {weights[k] / total:.3f}, {docs:,} "
                         f"documents, {tokens:,} tokens{extra}")
    lines.append(f"  this run: {train_samples:,} samples x {seq_length} = "
                 f"{train_samples * seq_length:,} tokens")
    for prefix, e in zip(plan.train[0], epochs):
        if e > 1:
            lines.append(f"warning: the run repeats data: {prefix} is read {e:.2f} times")
    return lines


class IndexedData(NamedTuple):
    train: GlobalSampleIterator
    valid: Samples


def build_indexed(plan: SplitPlan, tokenizer, seq_length: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int, seed: int, cache_dir: str, train_samples: int,
                  valid_samples: int, collate: Callable, header: str) -> IndexedData:
    """The train iterator (with its `summary` lines, `header` first) and the valid samples of
    a plan. A validation split of one prefix is built for at most one epoch, so evaluation
    (eval_batches, capped by the split's length) never reads a sample twice."""
    if len(plan.valid[0]) == 1:
        valid_samples = min(valid_samples, max(1, (plan.valid_sizes[0][1] - 1) // seq_length))
    train, valid = gpt_datasets(plan, tokenizer, seq_length, seed, cache_dir, train_samples,
                                valid_samples)
    it = GlobalSampleIterator(Samples(train), micro_batch_size, dp_rank, dp_size, seed,
                              collate)
    it.summary = summary_lines(plan, train, seq_length, train_samples, header)
    return IndexedData(it, Samples(valid))

