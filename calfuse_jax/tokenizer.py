"""CLIP BPE tokenizer: lower-cased byte-level BPE, <|startoftext|> ... <|endoftext|>, 77 tokens.

Built on transformers' `CLIPTokenizer`, given the parsed vocab.json + merges.txt explicitly and
checked against them (transformers 5 silently builds a 2-token vocabulary from `vocab_file=`).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# A handful of merges for random test checkpoints: text tokenises (almost) char by char.
TINY_MERGES = tuple(
    tuple(m.split())
    for m in ("t h", "th e</w>", "a n", "i n", "o n</w>", "e r", "an d</w>", "o f</w>")
)


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable-char table (the 256 base symbols of the BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    rest = [byte for byte in range(256) if byte not in printable]  # mapped to 256, 257, ...
    codes = printable + [256 + i for i in range(len(rest))]
    return dict(zip(printable + rest, map(chr, codes), strict=True))


def vocab_from_merges(merges: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> dict:
    """OpenAI CLIP's vocabulary: bytes, bytes + "</w>", one token per merge, SOT, EOT."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: index for index, token in enumerate(tokens)}


def write_vocab_files(
    folder: str | os.PathLike, merges: tuple[tuple[str, str], ...] = TINY_MERGES
) -> int:
    """Write vocab.json + merges.txt (HF format) for `merges`; returns the vocabulary size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = vocab_from_merges(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


class ClipTokenizer:
    """texts -> token ids int32 [B, context_length]; SOT first, EOT last (truncated if needed)."""

    def __init__(self, hf_tokenizer, context_length: int = 77):
        self.hf = hf_tokenizer
        self.context_length = context_length
        self.sot_id = int(hf_tokenizer.bos_token_id)
        self.eot_id = int(hf_tokenizer.eos_token_id)
        self.vocab_size = len(hf_tokenizer)

    def __call__(self, texts: list[str] | str) -> np.ndarray:  # -> [B, context_length] int32
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenizer expects a list of str")
        ids = self.hf(texts, padding="max_length", truncation=True, max_length=self.context_length)
        return np.asarray(ids["input_ids"], dtype=np.int32).reshape(len(texts), self.context_length)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#version"):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}:{number}: a merge line holds two symbols, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def tokenizer_from_folder(folder: str | os.PathLike, context_length: int = 77) -> ClipTokenizer:
    """ClipTokenizer from a folder with vocab.json + merges.txt, checked against those files."""
    from calfuse_jax.models.convert import import_transformers

    folder = Path(folder)
    if absent := [name for name in TOKENIZER_FILES if not (folder / name).is_file()]:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(absent)}: the CLIP tokenizer needs vocab.json and "
            "merges.txt (they ship with every Hugging Face CLIP checkpoint)."
        )
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = _read_merges(folder / "merges.txt")
    if absent_special := [t for t in (SOT, EOT) if t not in vocab]:
        raise ValueError(f"{folder}/vocab.json lacks the special tokens {absent_special}")
    specials = dict(bos_token=SOT, eos_token=EOT, pad_token=EOT, unk_token=EOT)
    hf = import_transformers().CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=context_length, **specials
    )
    if len(hf) != len(vocab) or hf.eos_token_id != vocab[EOT] or hf.bos_token_id != vocab[SOT]:
        raise ValueError(
            f"transformers built a {len(hf)}-token CLIP tokenizer from {folder}, whose vocab.json "
            f"has {len(vocab)} entries: the files were not used (check transformers' CLIPTokenizer "
            "arguments: it needs vocab=/merges=, not vocab_file=)."
        )
    return ClipTokenizer(hf, context_length)
