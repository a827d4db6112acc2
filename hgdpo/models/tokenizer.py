"""The real CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships.

SD1.5's tokenizer (and PickScore's) is OpenAI CLIP's byte-level BPE with 49408 tokens.
open_clip carries its merges as ``bpe_simple_vocab_16e6.txt.gz``; from it we rebuild the
exact vocabulary (256 byte symbols, the same with ``</w>``, one token per merge, then
``<|startoftext|>`` and ``<|endoftext|>``), so the embedded models tokenize prompts exactly as
SD1.5 does: ``"a photo of a cat"`` -> ``[49406, 320, 1125, 539, 320, 2368, 49407]``.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def bpe_file() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's CLIP vocabulary is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and its ordered BPE merges."""
    lines = gzip.open(bpe_file(), "rt", encoding="utf-8").read().split("\n")
    # The first line is a header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return vocab, merges


def clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary, padding with EOS like SD1.5."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # transformers 5 ignores vocab_file/merges_file in the constructor: pass the data itself.
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges),
                        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                        model_max_length=CLIP_MAX_LENGTH)
    return tok


def write_vocab_files(directory) -> None:
    """Store the tokenizer in a folder as SD1.5's repository does: ``vocab.json`` + ``merges.txt``.

    Replaces the ``tokenizer.json`` that ``save_pretrained`` writes (3.6 MB) by the two files
    (1.5 MB) from which transformers rebuilds the same tokenizer.
    """
    import json

    directory = Path(directory)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")
    (directory / "tokenizer.json").unlink(missing_ok=True)
