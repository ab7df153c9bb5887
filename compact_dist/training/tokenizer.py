"""Tokenizers of `compact-train` and `compact-preprocess`: one interface over four kinds.

`data.tokenizer` is one of

* `byte`: bytes 0..255 and end-of-document 256 (vocab 257);
* `bpe`: a byte-level BPE that compact-train trains on its own corpus (stdlib / files sources);
* a path to a Hugging Face `tokenizer.json` (the `tokenizers` library);
* a path to a local Hugging Face tokenizer directory (transformers' AutoTokenizer with
  `local_files_only=True`: never the hub);
* a path to a SentencePiece `.model` file (needs the `sentencepiece` package).

Every kind gives `vocab_size` (ids in [0, vocab_size), added tokens included) and `eod`, the
id appended after every document (Megatron's convention). EOD is `data.eod_token` when set,
else the tokenizer's own end of sequence (HF `eos_token`, SentencePiece `eos_id`), else the
first of `EOD_CANDIDATES` in the vocabulary; a tokenizer with none is refused (ValueError
naming data.tokenizer). `encode` adds no special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

EOD_TEXT = "<|endoftext|>"
EOD_CANDIDATES = (EOD_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
BUILTIN = ("byte", "bpe")

Kind = Literal["byte", "bpe", "sentencepiece"]


def tokenizer_kind(spec: str) -> str:
    """'byte', 'bpe', 'tokenizer.json', 'hf-directory' or 'sentencepiece' for a
    data.tokenizer value; ValueError (one line naming the key) for a path that is none."""
    if spec in BUILTIN:
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return "hf-directory"
    if not path.is_file():
        raise ValueError(f"data.tokenizer={spec!r}: no such file or directory (expected byte, "
                         "bpe, a tokenizer.json, a Hugging Face tokenizer directory or a "
                         "SentencePiece .model)")
    if path.suffix == ".json":
        return "tokenizer.json"
    if path.suffix == ".model":
        return "sentencepiece"
    raise ValueError(f"data.tokenizer={spec!r}: not a .json (Hugging Face tokenizer.json) nor "
                     "a .model (SentencePiece) file")


class Tokenizer:
    """`encode(str) -> list[int]`, `encode_batch`, `decode(list[int]) -> str` (special tokens
    dropped); `vocab_size` ids in [0, vocab_size), `eod` ends a document. `kind`: 'byte',
    'bpe' (anything backed by an HF `tokenizers.Tokenizer`, saved as tokenizer.json) or
    'sentencepiece'."""

    def __init__(self, kind: Kind, backend: Optional[Any] = None,
                 eod: Optional[int] = None) -> None:
        self.kind, self._hf, self._sp = kind, None, None
        if kind == "byte":
            self.vocab_size, self.eod = 257, 256
        elif kind == "bpe":
            self._hf = backend
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            self.eod = backend.token_to_id(EOD_TEXT) if eod is None else eod
        else:
            self._sp = backend
            self.vocab_size, self.eod = backend.get_piece_size(), eod
        self.spec = kind  # from_path: the path

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core's dataset cache keys hash of a tokenizer."""
        return {"tokenizer": self.spec, "vocab_size": self.vocab_size, "eod": self.eod}

    @classmethod
    def byte(cls) -> "Tokenizer":
        return cls("byte")

    @classmethod
    def train_bpe(cls, docs: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Byte-level BPE trained on `docs` (any iterable: a generator streams) with
        `<|endoftext|>` as id 0."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOD_TEXT], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(docs, trainer)
        return cls("bpe", hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A BPE tokenizer saved by `save` (HF tokenizer.json with `<|endoftext|>`)."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls("bpe", HFTokenizer.from_file(str(path)))

    @classmethod
    def from_path(cls, spec: str, eod_token: Optional[str] = None) -> "Tokenizer":
        """The tokenizer at `spec` (tokenizer.json, HF directory or SentencePiece model); every
        error one ValueError line naming data.tokenizer / data.eod_token."""
        kind = tokenizer_kind(spec)
        path = Path(spec).expanduser()
        if kind == "tokenizer.json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                hf = HFTokenizer.from_file(str(path))
            except Exception as err:  # tokenizers raises a bare Exception on bad JSON
                raise ValueError(f"data.tokenizer={spec!r}: not a Hugging Face tokenizer.json "
                                 f"({str(err).splitlines()[0]})") from None
            own = None
        elif kind == "hf-directory":
            hf, own = _hf_directory(spec, path)
        elif kind == "sentencepiece":
            return cls._sentencepiece(spec, path, eod_token)
        else:
            raise ValueError(f"data.tokenizer={spec!r} is built in, not a path")
        vocab = hf.get_vocab(with_added_tokens=True)
        tok = cls("bpe", hf, _pick_eod(spec, eod_token, own, vocab.get))
        tok.spec = spec
        return tok

    @classmethod
    def _sentencepiece(cls, spec: str, path: Path, eod_token: Optional[str]) -> "Tokenizer":
        try:
            import sentencepiece
        except ImportError:
            raise ValueError(f"data.tokenizer={spec!r} is a SentencePiece model, which needs "
                             "the sentencepiece package: pip install sentencepiece") from None
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as err:
            raise ValueError(f"data.tokenizer={spec!r}: not a SentencePiece model "
                             f"({str(err).splitlines()[0]})") from None
        own = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None

        def lookup(piece: str) -> Optional[int]:
            i = sp.piece_to_id(piece)
            return i if sp.id_to_piece(i) == piece and i != sp.unk_id() else None

        tok = cls("sentencepiece", sp, _pick_eod(spec, eod_token, own, lookup))
        tok.spec = spec
        return tok

    def save(self, path: str | Path) -> None:
        """tokenizer.json of a 'bpe' tokenizer (the others have no such file)."""
        if self._hf is not None:
            self._hf.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        if self._sp is not None:
            return self._sp.encode(texts)
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        if self._sp is not None:
            return self._sp.decode([i for i in ids if i != self.eod])
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _hf_directory(spec: str, path: Path) -> tuple[Any, Optional[str]]:
    """(HF tokenizers backend, the directory's eos_token) via AutoTokenizer, local files only."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"data.tokenizer={spec!r} is a tokenizer directory, which needs the "
                         "transformers package: pip install transformers") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise ValueError(f"data.tokenizer={spec!r}: not a Hugging Face tokenizer directory "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                         ) from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"data.tokenizer={spec!r}: {type(tok).__name__} is a slow tokenizer; "
                         "give a directory with a tokenizer.json (a fast tokenizer)")
    return backend, tok.eos_token


def _pick_eod(spec: str, eod_token: Optional[str], own: Optional[str], lookup) -> int:
    """Id of data.eod_token, else of the tokenizer's own EOS, else of an EOD_CANDIDATES entry."""
    if eod_token is not None:
        i = lookup(eod_token)
        if i is None:
            raise ValueError(f"data.eod_token={eod_token!r} is not in the vocabulary of "
                             f"data.tokenizer={spec!r}")
        return i
    for token in ((own,) if own else ()) + EOD_CANDIDATES:
        i = lookup(token)
        if i is not None:
            return i
    raise ValueError(f"data.tokenizer={spec!r} has no end-of-document token (no eos_token, none "
                     f"of {', '.join(EOD_CANDIDATES)}): set data.eod_token")


def load_tokenizer(spec: str, eod_token: Optional[str] = None) -> Tokenizer:
    """A path tokenizer or the byte tokenizer (`bpe` is trained per corpus: see data.py)."""
    if spec == "byte":
        return Tokenizer.byte()
    if spec == "bpe":
        raise ValueError("data.tokenizer=bpe is trained by compact-train on its own corpus; "
                         "give the tokenizer file or directory the data was made with")
    return Tokenizer.from_path(spec, eod_token)


def model_vocab_size(data) -> int:
    """Vocabulary (before padding) of the model compact-train builds for the data config
    `data` (a DataConfig): `bpe`: data.vocab_size (the size the BPE is trained to), `byte`:
    257, a path: that tokenizer's vocab_size (loaded as build_data loads it; ValueError
    naming data.tokenizer when it does not load). compact-train pads it for TP with
    train.padded_vocab_size; compact-plan / compact-memory do the same."""
    if data.tokenizer == "bpe":
        return data.vocab_size
    return load_tokenizer(data.tokenizer, data.eod_token).vocab_size

