"""Tiny random Hugging Face checkpoints for tests: built with `transformers`, saved as safetensors."""
from pathlib import Path

import torch


def tiny_llama(path, vocab_size=97, seed=0, **overrides):
    """Save a tiny LlamaForCausalLM to `path`; return the transformers model (eval mode, float32)."""
    import transformers

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, rope_theta=500.0, attention_bias=True,
                  tie_word_embeddings=False, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                  pad_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    model.save_pretrained(Path(path))
    return model


def tiny_gptj(path, vocab_size=97, seed=0, **overrides):
    """Save a tiny GPTJForCausalLM (rotary_dim < head_dim) to `path`; return the transformers model."""
    import transformers

    kwargs = dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.GPTJForCausalLM(transformers.GPTJConfig(**kwargs)).eval()
    model.save_pretrained(Path(path))
    return model
