"""LoRA (Hu et al. 2021), hand-written: W x + (alpha / r) B A dropout(x), the reference code's adapters on attention,
MLP and token embedding (PAPER.md, "Reference code defaults": r 8, alpha 16, dropout 0.05).

With LoRA the reference model pi_ref is the same weights with the adapters switched off (lora_disabled), so it costs
no second copy. runs.py saves the adapters alone and merges them into their base on loading (merge_lora).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as lm

# ----------------------------------------------------------------------------------------------
# LoRA: W x + (alpha / r) * B A dropout(x), with A random and B zero so training starts at W


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    @property
    def weight(self):
        return self.base.weight

    def delta_weight(self):
        return self.scale * self.lora_B @ self.lora_A  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))


class LoRAEmbedding(nn.Module):
    """Token embedding + (alpha / r) * (B A)^T rows: A (r, vocab) starts at zero, B (d, r) random."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.lora_A = nn.Parameter(torch.zeros(r, base.num_embeddings, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.randn(base.embedding_dim, r, device=base.weight.device) / r)

    @property
    def weight(self):
        return self.base.weight

    def delta_weight(self):
        return (self.scale * self.lora_B @ self.lora_A).T  # (vocab, d)

    def forward(self, ids):
        y = self.base(ids)
        if not self.enabled:
            return y
        return y + self.scale * (F.embedding(ids, self.lora_A.T) @ self.lora_B.T).to(y.dtype)


def add_lora(model: lm.Transformer, r: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Freeze the model and wrap every module whose last name is in `targets`; return the wrapped names."""
    model.requires_grad_(False)
    if model.config.tie_word_embeddings:
        # the embedding is also the output head: an adapter on it could not be merged into one tensor
        targets = [t for t in targets if t != "tok_embeddings"]
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] not in targets:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(module, nn.Linear):
            new = LoRALinear(module, r, alpha, dropout)
        elif isinstance(module, nn.Embedding):
            new = LoRAEmbedding(module, r, alpha)
        else:
            continue
        setattr(parent, name.split(".")[-1], new)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"--lora-targets {','.join(targets)}: no such modules (see model.py for names)")
    return wrapped


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]


@contextlib.contextmanager
def lora_disabled(model):
    """The base model, adapters off: LoRA's reference model costs no second copy of the weights."""
    mods = lora_modules(model)
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def merge_lora(model: lm.Transformer) -> lm.Transformer:
    """Fold each adapter into its base weight (W += scale * B A) and unwrap: a plain model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            module.base.weight += module.delta_weight().to(module.base.weight.dtype)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.split(".")[-1], module.base)
    model.tie_weights()
    return model
