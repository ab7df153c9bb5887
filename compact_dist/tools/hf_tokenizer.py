"""The run's tokenizer as Hugging Face tokenizer files (compact-export's tokenizer output): a
BPE or tokenizer.json path run's tokenizer.json, the byte tokenizer as an equivalent byte-level
BPE without merges, a SentencePiece run's model copied as tokenizer.model; the run's
end-of-document token is bos and eos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from compact_dist.training.run_files import SENTENCEPIECE_FILE, TOKENIZER_FILE
from compact_dist.training.tokenizer import EOD_TEXT


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of HF's ByteLevel)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_tokenizer():
    """compact_dist.training.tokenizer's byte tokenizer (ids 0..255 = bytes, 256 = end of
    document) as an HF `tokenizers` byte-level BPE without merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[EOD_TEXT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TEXT, special=True)])
    return tok


def save_tokenizer(tag_dir: Path, run: dict, out_dir: Path) -> None:
    """The run's tokenizer as HF files (tokenizer.json, tokenizer_config.json, ...), its
    end-of-document token as bos / eos; a SentencePiece run's model as tokenizer.model."""
    from transformers import PreTrainedTokenizerFast

    kind = run["tokenizer"]["kind"]
    if kind == "sentencepiece":
        import sentencepiece

        path = tag_dir / SENTENCEPIECE_FILE
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is missing (the run's SentencePiece model)")
        size = sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
        if size != run["tokenizer"]["vocab_size"]:
            raise ValueError(f"{path} has {size} pieces, the run recorded "
                             f"{run['tokenizer']['vocab_size']}")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(out_dir) / SENTENCEPIECE_FILE)
        return
    if kind == "bpe":
        path = tag_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is missing (the run's BPE tokenizer)")
        hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer())
    hf.bos_token = hf.eos_token = hf.convert_ids_to_tokens(run["tokenizer"]["eod"])
    hf.model_max_length = run["model"]["max_sequence_length"]
    if len(hf) != run["tokenizer"]["vocab_size"]:
        raise ValueError(f"tokenizer has {len(hf)} tokens, the run recorded "
                         f"{run['tokenizer']['vocab_size']}")
    hf.save_pretrained(str(out_dir))
    # transformers 5 names the class TokenizersBackend, which 4.x does not know; both load
    # PreTrainedTokenizerFast
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2))
