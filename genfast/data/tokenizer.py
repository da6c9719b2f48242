"""A CLIPTokenizer whose vocabulary is the caption grammar.

transformers' CLIPTokenizer is a byte-level BPE (vocabulary + merges). We build one in
which every grammar word is a single token. Anything else (an unknown word, a typo) ends up
as unknown tokens, so an out-of-grammar prompt still encodes instead of crashing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import CLIPTokenizer

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_LENGTH = 32  # longest two-shape caption is ~22 tokens with BOS/EOS


def build_tokenizer_files(words: list[str], out_dir: str | os.PathLike) -> Path:
    """Write a CLIPTokenizer for `words` (vocabulary, merges, config) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Learn the merges with the tokenizers library's BPE trainer on the grammar's words: with a
    # vocabulary budget larger than needed it merges every word into a single token, and the
    # merge ranks it picks never split one word in favour of another (hand-written merges do).
    bpe = Tokenizer(BPE(unk_token=UNK, end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=0, special_tokens=[BOS, EOS, UNK],
        end_of_word_suffix="</w>", show_progress=False,
    )
    bpe.train_from_iterator(words, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = CLIPTokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MAX_LENGTH,
    )
    # writes tokenizer.json + tokenizer_config.json, which CLIPTokenizer.from_pretrained reads
    tok.save_pretrained(out)
    return out


def build_tokenizer(words: list[str], out_dir: str | os.PathLike) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(build_tokenizer_files(words, out_dir))
