"""Offline CLIP tokenizer: the BPE vocabulary that open_clip ships, written as the vocab.json +
merges.txt pair that `transformers.CLIPTokenizer` reads. The ids match OpenAI CLIP's, so a tokenizer
built here is interchangeable with SDXL's without any download."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from open_clip.tokenizer import default_bpe
from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from anystory.atomic import write_atomic

# OpenAI CLIP keeps the first 49152 - 256 - 2 merges of the 16e6 BPE file.
_NUM_MERGES = 49152 - 256 - 2


def write_clip_vocab(directory: str | Path) -> Path:
    """Write vocab.json and merges.txt into `directory` (idempotent) and return it.

    Every rank of a multi-process run may call this on the same folder at once: each file is
    written atomically, so a rank that finds both files reads them whole, and ranks that write
    concurrently write the same bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        return directory
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols]
    symbols += ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    write_atomic(vocab_path, json.dumps({s: i for i, s in enumerate(symbols)}, ensure_ascii=False))
    write_atomic(merges_path, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return directory


def build_clip_tokenizer(directory: str | Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A 77-token CLIP tokenizer from the files written by `write_clip_vocab`.

    SDXL's second tokenizer pads with "!" (open_clip's id 0); pass `pad_token="!"` to match it.
    """
    directory = write_clip_vocab(directory)
    return CLIPTokenizer(
        vocab_file=str(directory / "vocab.json"),
        merges_file=str(directory / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )
