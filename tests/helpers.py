"""Helpers shared by the tests: small, fast, offline stand-ins for real checkpoints."""

from pathlib import Path

import data
from examples import toy as toy_tasks


def tiny_tokenizer(path: str | Path, vocab_size: int = 384) -> data.Tokenizer:
    """A byte-level BPE trained on ~300 toy sentences, saved to `path` and loaded back from the files.

    Special ids: <s> = 0 (BOS), </s> = 1 (EOS), <pad> = 2.
    """
    texts = toy_tasks.toy_corpus_texts(seed=0, n_examples=100)
    data.train_bpe_tokenizer(texts, vocab_size, out_dir=path)
    return data.load_tokenizer(path)


def toy_setup(d: str | Path, *, pairs_per_user: int, n_valid_per_user: int, n_unseen_users: int,
              n_train: int | None = None) -> Path:
    """A tiny random LLaMA-style checkpoint with the toy BPE in `d/base`, and a small toy task (4 known users)
    in `d/train.jsonl` and `d/valid.jsonl` (the first `n_train` training pairs when given). Returns `d`."""
    import model as lm

    d = Path(d)
    tok = data.train_bpe_tokenizer(toy_tasks.toy_corpus_texts(0, n_examples=300), 300, out_dir=d / "base")
    cfg = lm.ModelConfig(family="llama", vocab_size=tok.vocab_size, hidden_size=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=8, intermediate_size=64, tie_word_embeddings=True,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    lm.save_pretrained(lm.build_model(cfg, seed=0), d / "base")
    train_pairs, valid_pairs = toy_tasks.make_toy_task(seed=0, n_users=4, pairs_per_user=pairs_per_user,
                                                  n_valid_per_user=n_valid_per_user, n_unseen_users=n_unseen_users)
    data.write_pairs(d / "train.jsonl", train_pairs[:n_train])
    data.write_pairs(d / "valid.jsonl", valid_pairs)
    return d


def train_interrupted_at(step: int, cfg, monkeypatch) -> int:
    """train.train(cfg) stopped as Ctrl-C would stop it when optimizer step `step` begins; its exit code
    (130: a checkpoint of the last step boundary is kept, for --resume)."""
    import pytest

    import train

    real_get_lr = train.get_lr

    def interrupt(s, *args):
        if s == step:
            raise KeyboardInterrupt
        return real_get_lr(s, *args)

    with monkeypatch.context() as patched, pytest.raises(SystemExit) as exit_info:
        patched.setattr(train, "get_lr", interrupt)
        train.train(cfg)
    return exit_info.value.code
