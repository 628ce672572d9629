"""Helpers shared by the tests: small, fast, offline stand-ins for real checkpoints."""

from pathlib import Path

import data


def tiny_tokenizer(path: str | Path, vocab_size: int = 384) -> data.Tokenizer:
    """A byte-level BPE trained on ~300 toy sentences, saved to `path` and loaded back from the files.

    Special ids: <s> = 0 (BOS), </s> = 1 (EOS), <pad> = 2.
    """
    texts = data.toy_corpus_texts(seed=0, n_examples=100)
    data.train_bpe_tokenizer(texts, vocab_size, out_dir=path)
    return data.load_tokenizer(path)
