"""A text corpus from the running host's own Python installation and C headers (JSONL).

    python benchmarks/host_corpus.py --out .cache/host_corpus/host_corpus.jsonl

What goes in: every source / text file under the interpreter's `sysconfig` paths (stdlib,
platstdlib, purelib, platlib, include, platinclude: the standard library, every installed
package, Python's C headers) plus `/usr/include` and `/usr/local/include` if present. On a
GPU image with torch, triton, megatron-core, deepspeed and the NVIDIA wheels installed that is
a few hundred MB of Python, C/C++/CUDA headers and sources, and docs; no download, nothing
beyond what the machine already has. Which files:

- extensions (`--extensions`): .py .pyi .pyx .pxd .pxi (Python/Cython), .h .hh .hpp .hxx
  .inl .c .cc .cpp .cxx .cu .cuh (C/C++/CUDA), .txt .md .rst (docs), .cfg .toml .ini .yaml
  .yml (configs). JSON is left out by default: on these hosts it is mostly data (tokenizer
  vocabularies, schemas, test fixtures), not prose or code.
- skipped: files over `--max-file-bytes` (default 512 kB: generated tables, amalgamations),
  files with a NUL byte (binary) or invalid UTF-8, empty / whitespace-only files, files with a
  line over `--max-line-chars` (default 2000: minified code, embedded base64 or data arrays),
  `__pycache__` and `.git` directories;
- deduplicated by content (BLAKE2b of the bytes): a file whose exact content was already
  taken (vendored copies, licenses, identical headers under two roots) is dropped;
- roots are walked in the order above, directories and files in sorted order; a root nested in
  another (site-packages inside the stdlib directory of a pyenv / docker Python) is walked once,
  under its own name; symlinks to directories are not followed.

Order of the documents: the walk order, then a seeded shuffle (`--seed`, default 0;
`--no-shuffle` keeps the walk order). compact_dist.training.data splits train/valid by a random
document permutation, but its validation batches read the split's stream from the start and
`data.max_bytes` / `data.tokenizer_train_bytes` take the corpus from the start: with shuffled
documents every prefix is a uniform sample of the host (stdlib, packages and headers mixed),
not the alphabetically first files of the stdlib. Same host, same options: the same bytes.

`--max-bytes` stops once the next document would exceed that many UTF-8 bytes of text
(default: no limit). Each line is `{"text": <file content>, "path": "<root>/<relative path>"}`
(compact_dist.training.data reads `text`, `data.jsonl_key`). Next to the output, `<out>.meta.json`:
files, bytes, per-extension and per-root counts, duplicates dropped, skips by reason, the
roots, the Python version, elapsed seconds. The output is written to a temporary file and
renamed, so an interrupted run leaves no partial corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

EXTENSIONS = (
    ".py", ".pyi", ".pyx", ".pxd", ".pxi",
    ".h", ".hh", ".hpp", ".hxx", ".inl", ".c", ".cc", ".cpp", ".cxx", ".cu", ".cuh",
    ".txt", ".md", ".rst", ".cfg", ".toml", ".ini", ".yaml", ".yml",
)
SYSCONFIG_KEYS = ("stdlib", "platstdlib", "purelib", "platlib", "include", "platinclude")
SYSTEM_INCLUDES = (("usr_include", "/usr/include"), ("usr_local_include", "/usr/local/include"))
SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn"}


def host_roots() -> list[tuple[str, str]]:
    """(name, directory) of the host's Python installation and system headers, in walk order;
    missing directories and repeated ones (same real path) are left out."""
    paths = sysconfig.get_paths()
    roots = [(key, paths[key]) for key in SYSCONFIG_KEYS if paths.get(key)]
    return unique_roots(roots + list(SYSTEM_INCLUDES))


def unique_roots(roots: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    out, seen = [], set()
    for name, path in roots:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            out.append((name, real))
    return out


def walk_files(root: str, exclude: set[str]) -> Iterator[str]:
    """Files under `root`, directories and names sorted; directories whose real path is in
    `exclude` (other roots, walked on their own) are pruned."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIP_DIRS and os.path.realpath(os.path.join(dirpath, d)) not in exclude)
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def build_corpus(roots: list[tuple[str, str]], extensions: Iterable[str] = EXTENSIONS,
                 max_file_bytes: int = 512 * 1024, max_line_chars: int = 2000,
                 max_bytes: Optional[int] = None, seed: Optional[int] = 0
                 ) -> tuple[list[dict], dict]:
    """(documents [{"text", "path"}], meta) of the files under `roots`; see the module doc.
    seed None: walk order, else a random.Random(seed) shuffle of it."""
    start = time.perf_counter()
    extensions = tuple(e.lower() for e in extensions)
    roots = unique_roots(roots)
    real_roots = {real for _, real in roots}
    skipped = dict.fromkeys(("too_large", "binary", "not_utf8", "long_lines", "empty",
                             "unreadable", "max_bytes"), 0)
    docs: list[dict] = []
    seen: set[bytes] = set()
    duplicates = duplicate_bytes = 0
    for name, root in roots:
        for path in walk_files(root, real_roots - {root}):
            if not path.lower().endswith(extensions) or os.path.islink(path):
                continue
            try:
                if os.path.getsize(path) > max_file_bytes:
                    skipped["too_large"] += 1
                    continue
                with open(path, "rb") as f:
                    raw = f.read(max_file_bytes + 1)
            except OSError:
                skipped["unreadable"] += 1
                continue
            if len(raw) > max_file_bytes:  # grew since the stat
                skipped["too_large"] += 1
                continue
            if b"\0" in raw:
                skipped["binary"] += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["not_utf8"] += 1
                continue
            if not text.strip():
                skipped["empty"] += 1
                continue
            if max(map(len, text.splitlines())) > max_line_chars:
                skipped["long_lines"] += 1
                continue
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            if digest in seen:
                duplicates += 1
                duplicate_bytes += len(raw)
                continue
            seen.add(digest)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            docs.append({"text": text, "path": f"{name}/{rel}", "_bytes": len(raw)})
    if seed is not None:
        random.Random(seed).shuffle(docs)
    total, kept = 0, []
    for doc in docs:
        if max_bytes is not None and total + doc["_bytes"] > max_bytes:
            skipped["max_bytes"] = len(docs) - len(kept)
            break
        total += doc["_bytes"]
        kept.append(doc)
    per_ext: dict[str, dict[str, int]] = {}
    per_root: dict[str, dict[str, int]] = {}
    for doc in kept:
        n = doc.pop("_bytes")
        ext = os.path.splitext(doc["path"])[1].lower()
        for table, key in ((per_ext, ext), (per_root, doc["path"].split("/", 1)[0])):
            entry = table.setdefault(key, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += n
    meta = {
        "files": len(kept), "bytes": total,
        "per_extension": dict(sorted(per_ext.items(), key=lambda kv: -kv[1]["bytes"])),
        "per_root": per_root,
        "duplicates_dropped": duplicates, "duplicate_bytes": duplicate_bytes,
        "skipped": skipped,
        "roots": [{"name": n, "path": p} for n, p in roots],
        "extensions": list(extensions), "max_file_bytes": max_file_bytes,
        "max_line_chars": max_line_chars, "max_bytes": max_bytes, "seed": seed,
        "python": platform.python_version(), "host": platform.node(),
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    return kept, meta


def write_jsonl(docs: list[dict], out: Path) -> None:
    """One JSON object per line, via a temporary file renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--root", action="append", default=None, metavar="NAME=DIR",
                        help="walk these directories instead of the host's (repeatable)")
    parser.add_argument("--extensions", default=",".join(EXTENSIONS),
                        help="comma-separated file extensions to keep")
    parser.add_argument("--max-file-bytes", type=int, default=512 * 1024)
    parser.add_argument("--max-line-chars", type=int, default=2000)
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="stop before exceeding this many bytes of text (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="document shuffle seed")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the walk order")
    args = parser.parse_args(argv)
    if args.root:
        roots = [tuple(r.split("=", 1)) if "=" in r else (Path(r).name, r) for r in args.root]
    else:
        roots = host_roots()
    docs, meta = build_corpus(
        roots, [e.strip() for e in args.extensions.split(",") if e.strip()],
        args.max_file_bytes, args.max_line_chars, args.max_bytes,
        None if args.no_shuffle else args.seed)
    out = Path(args.out)
    t = time.perf_counter()
    write_jsonl(docs, out)
    meta["write_s"] = round(time.perf_counter() - t, 3)
    meta["jsonl_bytes"] = out.stat().st_size
    meta_path(out).write_text(json.dumps(meta, indent=1))
    summary = {k: v for k, v in meta.items() if k not in ("per_extension", "roots", "extensions")}
    summary["per_extension"] = {k: v["files"] for k, v in meta["per_extension"].items()}
    print(json.dumps(summary, indent=1))
    print(f"{meta['files']} files, {meta['bytes'] / 1e6:.1f} MB of text -> {out} "
          f"({meta['jsonl_bytes'] / 1e6:.1f} MB) in {meta['elapsed_s'] + meta['write_s']:.1f} s",
          file=sys.stderr)
    return meta


if __name__ == "__main__":
    main()
