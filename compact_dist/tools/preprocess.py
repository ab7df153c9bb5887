"""`compact-preprocess`: text -> Megatron indexed dataset (`.bin`/`.idx`) for data.source=indexed.

    compact-preprocess --input data/*.jsonl --tokenizer tok/tokenizer.json \\
        --output-prefix data/corpus [--json-keys text] [--workers 4]

Inputs: files, globs or directories (the files under them, sorted). `.jsonl` / `.json` files
hold one JSON object per line, and each `--json-keys` field is one document; any other file is
one UTF-8 text document. Every document is tokenized (no special tokens), followed by the
tokenizer's end-of-document id (Megatron's convention), and written with megatron-core's
IndexedDatasetBuilder: `<prefix>.bin/.idx` for one key, `<prefix>_<key>.bin/.idx` for each of
several. The output is what Megatron-LM's preprocess_data.py writes and IndexedDataset reads.

Memory is bounded: documents stream from the inputs in batches of `--batch-size`, at most
2 x workers batches are in flight, and the builder writes each finished batch out in order.
A progress bar (tqdm) counts input bytes. A malformed line stops the run with
`FILE:LINE: ...` and leaves no output (files are written under a temporary name, renamed at
the end). The writer, `write_indexed` (compact_dist/training/indexed_writer.py), is also how
compact-train tokenizes its stdlib / files corpus into data.cache_dir.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from compact_dist.training.indexed_writer import write_indexed

JSON_SUFFIXES = (".jsonl", ".json")


def input_files(patterns: list[str]) -> list[Path]:
    """Files of the inputs in order: a directory means the files under it (sorted), a glob the
    files it matches (sorted); ValueError for one that gives none."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                           if os.path.isfile(p))
        if not found:
            raise ValueError(f"--input {pattern!r}: no such file, or no files under it / "
                             "matching it")
        files.extend(f for f in found if f not in files)
    return files


def documents(files: list[Path], keys: list[str]) -> Iterator[tuple[list[str], int]]:
    """(one text per key, input bytes consumed) per document, streaming."""
    for path in files:
        if path.suffix not in JSON_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
            yield [text] * len(keys), path.stat().st_size
            continue
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: not a JSON object")
                missing = [k for k in keys if not isinstance(obj.get(k), str)]
                if missing:
                    raise ValueError(f"{path}:{lineno}: expected a string field {missing[0]!r} "
                                     "(--json-keys)")
                yield [obj[k] for k in keys], len(raw)


def output_prefixes(prefix: str, keys: list[str]) -> list[str]:
    return [prefix] if len(keys) == 1 else [f"{prefix}_{k}" for k in keys]


def preprocess(inputs: list[str], tokenizer: str, output_prefix: str,
               json_keys: list[str] = ("text",), workers: int = 1, batch_size: int = 256,
               eod_token: Optional[str] = None, progress: bool = True) -> dict:
    """Tokenize `inputs` into indexed datasets; returns {"documents", "tokens", "prefixes"}."""
    from tqdm import tqdm

    from compact_dist.training.tokenizer import load_tokenizer

    keys = list(json_keys)
    files = input_files(inputs)
    load_tokenizer(tokenizer, eod_token)  # the checks, in this process, before any work
    prefixes = output_prefixes(output_prefix, keys)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
               desc="compact-preprocess", disable=not progress, file=sys.stderr)
    try:
        counts = write_indexed(documents(files, keys), tokenizer, prefixes, workers,
                               batch_size, eod_token, bar)
    finally:
        bar.close()
    return {**counts, "prefixes": prefixes}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="compact-preprocess",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="files, globs or directories (.jsonl/.json: JSON lines)")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer.json, a local Hugging Face tokenizer directory, a "
                             "SentencePiece .model, or byte")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin/.idx (PREFIX_KEY.* for several --json-keys)")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--eod-token", default=None,
                        help="end-of-document token text (default: the tokenizer's own)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--batch-size", type=int, default=256,
                        help="documents per worker task (memory: 2 x workers batches)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_keys,
                         args.workers, args.batch_size, args.eod_token, not args.no_progress)
    except ValueError as err:
        print(f"compact-preprocess: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{out['documents']:,} documents, {out['tokens']:,} tokens -> "
          + ", ".join(p + ".{bin,idx}" for p in out["prefixes"]))


if __name__ == "__main__":
    main()
