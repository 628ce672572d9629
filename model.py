"""A hand-written GPT-J / LLaMA transformer that loads Hugging Face safetensors checkpoints.

This is the language model of P-RLHF (PAPER.md, "Personalized LM"). The personalized LM feeds a
*soft prefix* of user embeddings right after BOS:

    [BOS] [e_u: T_u vectors] [user text] [prompt tokens] [response tokens] [EOS]

so the model accepts either token ids or input embeddings, and positions count the prefix.

References (read to understand, not copied):
- LLaMA (Touvron et al. 2023): RMSNorm, rotary embeddings (rotate-half), SwiGLU, grouped-query attention.
  Llama 3.1's long-context rope scaling ("llama3" rope type).
- GPT-J 6B (Wang & Komatsuzaki 2021): partial rotary on the first `rotary_dim` dims with interleaved
  pairs, attention and MLP in parallel off one LayerNorm, gelu_new, lm_head with bias.
- The Hugging Face checkpoint layout (config.json + model.safetensors[.index.json]); the mapping from
  their tensor names to ours is written out in `hf_key_map`.

Reading order: config, norms, rotary, attention, MLP, block, transformer, loading/saving, generation.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("llama", "gptj")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    family: str  # "llama" or "gptj"
    vocab_size: int
    hidden_size: int  # d, the size of a user-embedding vector too
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1: {"rope_type": "llama3", "factor": ..., ...}
    rotary_dim: int | None = None  # GPT-J: rotary on the first rotary_dim dims of each head
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config.json dict (LLaMA family or GPT-J)."""
        model_type = hf.get("model_type")
        ids = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                   pad_token_id=hf.get("pad_token_id"))
        if model_type == "llama":
            n_heads = hf["num_attention_heads"]
            rope = hf.get("rope_parameters") or {}  # transformers 5 puts theta and scaling here
            theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
            scaling = hf.get("rope_scaling")
            if rope.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
                scaling = None
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "llama3":
                raise ValueError(f"{source}: rope scaling {scaling} is not supported (only 'llama3')")
            return cls(
                family="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta), rope_scaling=scaling,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                tie_word_embeddings=hf.get("tie_word_embeddings", False), **ids)
        if model_type == "gptj":
            d, n_heads = hf["n_embd"], hf["n_head"]
            return cls(
                family="gptj", vocab_size=hf["vocab_size"], hidden_size=d, n_layers=hf["n_layer"],
                n_heads=n_heads, n_kv_heads=n_heads, head_dim=d // n_heads,
                intermediate_size=hf.get("n_inner") or 4 * d,
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), rotary_dim=hf.get("rotary_dim") or d // n_heads,
                max_position_embeddings=hf.get("n_positions", 2048),
                tie_word_embeddings=hf.get("tie_word_embeddings", False), **ids)
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    def to_hf(self) -> dict:
        """The config.json that `transformers` reads back into the same architecture."""
        ids = {k: v for k, v in dict(bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                                     pad_token_id=self.pad_token_id).items() if v is not None}
        if self.family == "llama":
            rope = {"rope_type": "default", "rope_theta": self.rope_theta}
            if self.rope_scaling:
                rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=self.vocab_size,
                        hidden_size=self.hidden_size, num_hidden_layers=self.n_layers,
                        num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                        head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                        rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, rope_parameters=rope,
                        rope_scaling=self.rope_scaling, hidden_act="silu",
                        max_position_embeddings=self.max_position_embeddings,
                        attention_bias=self.attention_bias, mlp_bias=self.mlp_bias,
                        tie_word_embeddings=self.tie_word_embeddings, **ids)
        return dict(model_type="gptj", architectures=["GPTJForCausalLM"], vocab_size=self.vocab_size,
                    n_embd=self.hidden_size, n_layer=self.n_layers, n_head=self.n_heads,
                    rotary_dim=self.rotary_dim, n_inner=self.intermediate_size,
                    layer_norm_epsilon=self.norm_eps, activation_function="gelu_new",
                    n_positions=self.max_position_embeddings,
                    tie_word_embeddings=self.tie_word_embeddings, **ids)


# A tiny LLaMA for the demo and the benchmarks on it (with a vocabulary of a few hundred tokens it has
# about 0.1M parameters and trains in seconds on a laptop CPU). Untied: see examples/demo.py.
TINY_LLAMA = dict(family="llama", hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  intermediate_size=128, tie_word_embeddings=False, max_position_embeddings=256)


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Read a checkpoint directory's config.json (or a config.json file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; expected a Hugging Face checkpoint directory")
    try:
        hf = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    try:
        return ModelConfig.from_hf(hf, source=str(file))
    except KeyError as e:
        raise ValueError(f"{file}: missing field {e.args[0]!r}") from None


# ----------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """LLaMA: x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "llama":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """theta_i = base^(-2i/dim) for the rotated dims; Llama 3.1 rescales the low frequencies."""
    dim = cfg.rotary_dim if cfg.family == "gptj" else cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = cfg.rope_scaling
    if s:  # "llama3": wavelengths longer than low_freq_wavelen are slowed by `factor`, smoothly in between
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        middle = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(middle, smoothed, inv_freq)
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype):
    """cos and sin of position * theta_i, each (B, T, dim/2), computed in float32."""
    angles = position_ids[..., None].float() * inv_freq.float()  # (B, T, dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, family: str) -> torch.Tensor:
    """Rotate pairs of dims of x (B, nh, T, hs) by the position angles.

    LLaMA pairs dim i with dim i + hs/2 ("rotate half"); GPT-J pairs neighbours (2i, 2i+1) and
    rotates only the first rotary_dim dims.
    """
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, dim/2)
    if family == "llama":
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin
    rot, rest = x[..., : 2 * cos.shape[-1]], x[..., 2 * cos.shape[-1]:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention with an optional KV cache


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_heads, max_len, head_dim) each."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.length = 0  # positions filled so far (same for every layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k, v (B, nkv, T, hs) and return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        qkv_bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=qkv_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        hs, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        q = self.wq(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin, self.cfg.family), apply_rotary(k, cos, sin, self.cfg.family)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hs), S = past + T
        # mask None: plain causal attention (right padding never changes earlier positions)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=nkv != nh)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(B, T, nh * hs))


# ----------------------------------------------------------------------------------------------
# MLP and block


class MLP(nn.Module):
    """LLaMA: SwiGLU, w2(silu(w1 x) * w3 x). GPT-J: w2(gelu_new(w1 x)) with biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.family = cfg.family
        d, h = cfg.hidden_size, cfg.intermediate_size
        bias = cfg.mlp_bias or cfg.family == "gptj"
        self.w1 = nn.Linear(d, h, bias=bias)
        self.w2 = nn.Linear(h, d, bias=bias)
        if cfg.family == "llama":
            self.w3 = nn.Linear(d, h, bias=bias)

    def forward(self, x):
        if self.family == "llama":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))  # gelu_new is the tanh approximation


class Block(nn.Module):
    """LLaMA: x + attn(norm(x)), then + mlp(norm(.)). GPT-J: x + attn(norm(x)) + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = cfg.family == "gptj"
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg, layer)
        self.feed_forward = MLP(cfg)
        if not self.parallel:
            self.ffn_norm = make_norm(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        h = self.attention_norm(x)
        if self.parallel:
            return x + self.attention(h, cos, sin, mask, cache) + self.feed_forward(h)
        x = x + self.attention(h, cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------
# Transformer


def attention_mask_4d(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, S) 1 = token / 0 = pad  ->  boolean (B, 1, q_len, S), True where a query may look.

    Queries are the last q_len of the S positions. Each position attends causally to real tokens, and
    always to itself, so a pad query never has an empty row (an empty row would give NaN in SDPA).
    """
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - q_len, S, device=attention_mask.device)[:, None]  # (q_len, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (q_len, S)
    allowed = causal & attention_mask[:, None, :].bool()  # (B, q_len, S)
    return (allowed | (k_pos == q_pos))[:, None]  # (B, 1, q_len, S)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.family == "gptj")
        self.inv_freq = rope_inv_freq(cfg)  # float32 always: not a buffer, so .to(dtype) leaves it
        self.grad_checkpointing = False
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def set_grad_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enabled

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, return_hidden: bool = False):
        """Logits (B, T, vocab), or the final normed hidden states (B, T, d) with return_hidden.

        input_ids (B, T) or inputs_embeds (B, T, d). attention_mask (B, S) covers cached and new
        positions (1 = token, 0 = pad); leave it None for right-padded batches, whose padding
        cannot affect earlier positions under causal attention. Positions default to 0..T-1 after
        the cache, or count real tokens when a mask is given (left padding).
        A boolean attention_mask (B, 1, T, S), True where a query may look, is used as it is, with the
        position_ids that must come with it (prlhf's shared-prompt rows: two responses after one prompt).
        """
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        ready_mask = attention_mask is not None and attention_mask.dim() == 4
        if ready_mask and position_ids is None:
            raise ValueError("a 4D attention_mask (B, 1, T, S) needs explicit position_ids (B, T)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)  # (B, T, rot/2)
        mask = None
        if ready_mask:
            mask = attention_mask.bool()
        elif attention_mask is not None:
            mask = attention_mask_4d(attention_mask, T)
        elif cache is not None and past > 0:
            mask = torch.ones(1, 1, T, past + T, dtype=torch.bool, device=x.device).tril(past)
        for block in self.layers:
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        return x if return_hidden else self.output(x)


def build_model(cfg: ModelConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> Transformer:
    """A freshly initialised model (normal(0, 0.02) weights, as GPT-2/LLaMA training recipes use)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=0.02)
    return model.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints: the one place where their names meet ours


def hf_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face tensor name -> our parameter name, for every tensor of the checkpoint."""
    if cfg.family == "llama":
        top = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
        if not cfg.tie_word_embeddings:
            top["lm_head.weight"] = "output.weight"
        per_layer = {
            "input_layernorm.weight": "attention_norm.weight",
            "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3",
        }
        hf_layer, linear_bias = "model.layers.{i}.", {"self_attn": cfg.attention_bias, "mlp": cfg.mlp_bias}
    else:
        top = {"transformer.wte.weight": "tok_embeddings.weight", "transformer.ln_f.weight": "norm.weight",
               "transformer.ln_f.bias": "norm.bias", "lm_head.weight": "output.weight",
               "lm_head.bias": "output.bias"}
        per_layer = {
            "ln_1.weight": "attention_norm.weight", "ln_1.bias": "attention_norm.bias",
            "attn.q_proj": "attention.wq", "attn.k_proj": "attention.wk",
            "attn.v_proj": "attention.wv", "attn.out_proj": "attention.wo",
            "mlp.fc_in": "feed_forward.w1", "mlp.fc_out": "feed_forward.w2",
        }
        hf_layer, linear_bias = "transformer.h.{i}.", {"attn": False, "mlp": True}
    mapping = dict(top)
    for i in range(cfg.n_layers):
        for hf_name, ours in per_layer.items():
            hf_name, ours = hf_layer.format(i=i) + hf_name, f"layers.{i}.{ours}"
            if hf_name.endswith((".weight", ".bias")):  # a norm
                mapping[hf_name] = ours
                continue
            mapping[hf_name + ".weight"] = ours + ".weight"
            if linear_bias[hf_name.split(".")[-2]]:
                mapping[hf_name + ".bias"] = ours + ".bias"
    return mapping


# Tensors some checkpoints carry that are not weights (cached masks and rotary tables): skipped.
IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@contextlib.contextmanager
def readable_safetensors(file):
    """Turn safetensors' own error for a truncated or corrupt file into one that names the file."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e}); the file is truncated or corrupt: "
                         f"copy or save the checkpoint again") from None


def checkpoint_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8-sig"))["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                f"(pickle checkpoints like pytorch_model.bin are never loaded)")
    with readable_safetensors(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}


def load_pretrained(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a Hugging Face LLaMA-family or GPT-J checkpoint directory.

    The model is built on the meta device, memory is allocated once in the target dtype, and each
    tensor is read from disk, cast and copied in on its own: no second full copy of the weights.
    """
    from safetensors import safe_open

    path = Path(path)
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # free on meta: nothing is allocated yet
    model = model.to_empty(device=device)  # one allocation, in the target dtype
    model.tie_weights()
    files = checkpoint_files(path)
    mapping = hf_key_map(cfg)
    params = dict(model.named_parameters())
    missing = sorted(set(mapping) - set(files))
    ignored = IGNORED_HF_SUFFIXES + (("lm_head.weight",) if cfg.tie_word_embeddings else ())  # a tied copy
    unexpected = sorted(n for n in files if n not in mapping and not n.endswith(ignored))
    wrong_shape = []
    for file in sorted(set(files.values())):
        with readable_safetensors(file), safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in mapping:
                    continue
                target = params[mapping[name]]
                tensor = f.get_tensor(name)
                if tensor.shape != target.shape:
                    wrong_shape.append(f"{name} {tuple(tensor.shape)} != expected {tuple(target.shape)}")
                    continue
                with torch.no_grad():
                    target.copy_(tensor.to(dtype))
                del tensor
    problems = ([f"missing: {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected: {', '.join(unexpected)}"] if unexpected else []) + \
               ([f"wrong shape: {'; '.join(wrong_shape)}"] if wrong_shape else [])
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json ({cfg.family}): " + " | ".join(problems))
    return model.eval()


def save_pretrained(model: Transformer, path, max_shard_bytes: int | None = None):
    """Write config.json and model.safetensors (sharded with an index when max_shard_bytes is set)
    in the Hugging Face layout, so `transformers` opens what we train. Files appear atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ours = dict(model.state_dict())
    tensors = {hf: ours[name].detach().contiguous().cpu() for hf, name in hf_key_map(model.config).items()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _atomic_write_text(path / "config.json", json.dumps({**model.config.to_hf(), "torch_dtype": dtype}, indent=2))
    if len(shards) == 1:
        _atomic_save(save_file, shards[0], path / "model.safetensors")
        _remove_stale_weights(path, keep={"model.safetensors"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(save_file, shard, path / file)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _atomic_write_text(path / "model.safetensors.index.json",
                       json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _remove_stale_weights(path, keep={"model.safetensors.index.json", *weight_map.values()})


def _remove_stale_weights(path: Path, keep: set[str]):
    """Delete weight files of an earlier save into the same directory: a stale index would be read
    instead of a new model.safetensors, and stale shards would sit next to the new ones."""
    for old in [path / "model.safetensors", path / "model.safetensors.index.json",
                *path.glob("model-*-of-*.safetensors")]:
        if old.name not in keep and old.is_file():
            old.unlink()


def _atomic_save(save_file, tensors, file: Path):
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)


def _atomic_write_text(file: Path, text: str):
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


# ----------------------------------------------------------------------------------------------
# Generation with a KV cache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits (B, vocab): greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus: smallest set of tokens with mass >= top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def constrain_logits(logits: torch.Tensor, histories: list[list[int]], forbid_eos: bool, eos: set,
                     repetition_penalty: float, no_repeat_ngram_size: int) -> torch.Tensor:
    """Hugging Face's generation constraints, which hide a model's degeneration rather than measure it
    (the paper's authors' generation code sets them). histories: each row's prompt + new tokens so far.

    repetition_penalty p: the logit of every token already in the row is divided by p if positive,
    multiplied by p if not. no_repeat_ngram_size n: a token that would repeat an n-gram of the row gets
    -inf. forbid_eos (before min_new_tokens): EOS gets -inf.
    """
    logits = logits.clone()  # (B, vocab)
    n = no_repeat_ngram_size
    for b, seq in enumerate(histories):
        if repetition_penalty != 1.0 and seq:
            seen = torch.tensor(sorted(set(seq)), device=logits.device)
            scores = logits[b, seen]
            logits[b, seen] = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
        if n and len(seq) >= n:
            last = tuple(seq[len(seq) - n + 1:])  # the n - 1 tokens a new token would complete an n-gram with
            banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == last}
            logits[b, sorted(banned)] = -float("inf")
    if forbid_eos and eos:
        logits[:, sorted(eos)] = -float("inf")
    return logits


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             prefix_embeds: torch.Tensor | None = None, eos_token_id: int | list | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, min_new_tokens: int = 0) -> list[list[int]]:
    """Continue each prompt (token ids, starting with BOS) and return the new tokens per prompt.

    prefix_embeds (B, T_u, d) is a soft prefix placed right after each prompt's first token
    (the personalized LM's [BOS] [e_u] [prompt] layout). Prompts of different lengths are left-padded;
    a row stops at EOS (which it keeps) or after max_new_tokens. repetition_penalty,
    no_repeat_ngram_size and min_new_tokens are off by default (see constrain_logits).
    """
    cfg, device = model.config, model.tok_embeddings.weight.device
    B, n_prefix = len(prompts), 0 if prefix_embeds is None else prefix_embeds.shape[1]
    lengths = [len(p) + n_prefix for p in prompts]
    T0 = max(lengths)
    x = torch.zeros(B, T0, cfg.hidden_size, dtype=model.tok_embeddings.weight.dtype, device=device)
    mask = torch.zeros(B, T0 + max_new_tokens, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # left padding: row b = [pad...] [BOS] [e_u] [rest of prompt]
        emb = model.tok_embeddings(torch.tensor(p, device=device))  # (len(p), d)
        if prefix_embeds is not None:
            emb = torch.cat([emb[:1], prefix_embeds[b].to(emb.dtype), emb[1:]])  # (len(p) + T_u, d)
        x[b, T0 - lengths[b]:] = emb
        mask[b, T0 - lengths[b]:T0] = 1
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    cache = KVCache(cfg, B, T0 + max_new_tokens, x.dtype, device)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    hidden = model(inputs_embeds=x, attention_mask=mask[:, :T0], cache=cache, return_hidden=True)
    for step in range(max_new_tokens):
        logits = model.output(hidden[:, -1])  # (B, vocab)
        if repetition_penalty != 1.0 or no_repeat_ngram_size or step < min_new_tokens:
            logits = constrain_logits(logits, [p + o for p, o in zip(prompts, out)], step < min_new_tokens, eos,
                                      repetition_penalty, no_repeat_ngram_size)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        for b in torch.nonzero(~done).flatten().tolist():
            out[b].append(token[b].item())
        done |= torch.tensor([t in eos for t in token.tolist()], device=device)
        if done.all() or step == max_new_tokens - 1:
            break
        mask[:, T0 + step] = 1
        hidden = model(token[:, None], attention_mask=mask[:, :T0 + step + 1], cache=cache, return_hidden=True)
    return out
