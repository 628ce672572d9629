"""Tiny random Hugging Face checkpoints for tests: built with `transformers`, saved as safetensors."""
from pathlib import Path

import torch


def redraw_parameters_(model, std: float, seed: int = 0):
    """Re-draw every parameter of a transformers model: weights and biases ~ N(0, std), norm weights
    ~ 1 + N(0, 0.1). Their own init leaves biases at 0 and norms at 1 (so a misplaced bias or norm
    would go unseen), and its std 0.02 makes attention nearly uniform (so rotary bugs barely show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are listed once
            noise = torch.randn(p.shape, generator=gen)
            is_norm = p.ndim == 1 and name.endswith("weight")  # RMSNorm / LayerNorm scales
            p.copy_(1 + 0.1 * noise if is_norm else std * noise)
    return model


def tiny_llama(path, vocab_size=97, seed=0, std=None, **overrides):
    """Save a tiny LlamaForCausalLM to `path`; return the transformers model (eval mode, float32).

    std: when given, every parameter is re-drawn (`redraw_parameters_`) before saving."""
    import transformers

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, rope_theta=500.0, attention_bias=True,
                  tie_word_embeddings=False, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                  pad_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    if std is not None:
        redraw_parameters_(model, std, seed)
    model.save_pretrained(Path(path))
    return model


def tiny_gptj(path, vocab_size=97, seed=0, std=None, **overrides):
    """Save a tiny GPTJForCausalLM (rotary_dim < head_dim) to `path`; return the transformers model.

    std: when given, every parameter is re-drawn (`redraw_parameters_`) before saving."""
    import transformers

    kwargs = dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.GPTJForCausalLM(transformers.GPTJConfig(**kwargs)).eval()
    if std is not None:
        redraw_parameters_(model, std, seed)
    model.save_pretrained(Path(path))
    return model
