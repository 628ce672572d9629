"""model.py against Hugging Face `transformers`: the same tiny random checkpoints, read by both.

The checkpoints are built and saved by `transformers` (tests/hf_models.py) with every parameter re-drawn
at std 0.2, biases and norm weights included, so each tensor and the rotary angles visibly move the logits
(logits up to ~6; scaling the rotary frequencies by 1.01 moves them by 0.5-2, shifting the first layer's
q bias by 1e-3 moves them by ~1e-2). A difference under the 1e-4 tolerance therefore means the same
computation. Each test also checks that what it compares is not trivially equal (logits not ~0, rows differ,
sampling differs from greedy, ...).
"""
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from tests.hf_models import tiny_gptj, tiny_llama

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # float32 logits, max abs difference
STD = 0.2  # std of every re-drawn parameter
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# name -> (builder, overrides). Defaults of the builders: vocab 97, d 64, 2 layers, 4 heads, bos 0, eos 1, pad 2.
CASES = {
    # 4 query heads sharing 2 kv heads, q/k/v/o biases, theta 500, separate lm_head
    "llama": (tiny_llama, {}),
    # multi-query (1 kv head), lm_head tied to the embeddings
    "llama_tied": (tiny_llama, dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=20000.0)),
    # Llama 3.1 style: "llama3" rope scaling, head_dim 24 != 64 / 4, MLP biases
    "llama31": (tiny_llama, dict(head_dim=24, mlp_bias=True, attention_bias=False, rope_theta=50000.0,
                                 rope_scaling=LLAMA3_SCALING)),
    # rotary on the first 8 of 16 dims per head, parallel attention + MLP, lm_head bias
    "gptj": (tiny_gptj, {}),
}
BOS, EOS, PAD = 0, 1, 2


@pytest.fixture(scope="module", params=list(CASES))
def ckpt(request, tmp_path_factory):
    """(name, transformers model, checkpoint directory) for each case."""
    build, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, build(path, std=STD, **overrides), path


@pytest.fixture(scope="module")
def ours_fp32(ckpt):
    return M.load_pretrained(ckpt[2])


def random_ids(batch, length, seed=0):
    """Token ids that avoid the special ids, starting with BOS."""
    ids = torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    return ids


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_close(ours, ref, tol=TOL):
    """Close within tol, and ref is not ~0 (so a small difference means something)."""
    assert ref.abs().max() > 1.0, "reference logits too small for the comparison to mean anything"
    assert max_diff(ours, ref) <= tol, f"max abs diff {max_diff(ours, ref):.3g} > {tol}"


# ----------------------------------------------------------------------------------------------
# Logits


@torch.no_grad()
def test_logits_match_transformers(ckpt, ours_fp32):
    _, hf, _ = ckpt
    ids = random_ids(2, 48)  # past the llama3 scaling's original_max_position_embeddings (32)
    check_close(ours_fp32(ids), hf(ids).logits)


@torch.no_grad()
def test_soft_prefix_matches_inputs_embeds(ckpt, ours_fp32):
    """[emb(BOS)] [T_u free vectors] [emb(rest)], the personalized LM's input, as inputs_embeds."""
    _, hf, _ = ckpt
    ids = random_ids(2, 20, seed=1)
    emb = hf.get_input_embeddings()(ids)  # (B, T, d)
    prefix = STD * torch.randn(2, 5, emb.shape[-1], generator=torch.Generator().manual_seed(2))
    x = torch.cat([emb[:, :1], prefix, emb[:, 1:]], dim=1)  # (B, 1 + T_u + T - 1, d)
    ours, ref = ours_fp32(inputs_embeds=x), hf(inputs_embeds=x).logits
    check_close(ours, ref)
    assert max_diff(ours[:, 6:], ours_fp32(ids)[:, 1:]) > 0.1  # the prefix does change what follows


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_transformers(ckpt, ours_fp32, side):
    """Two rows of 14 and 8 tokens, padded with PAD: the real positions match transformers and the
    unpadded row alone."""
    _, hf, _ = ckpt
    long, short = random_ids(1, 14, seed=3)[0], random_ids(1, 8, seed=4)[0]
    pad = torch.full((6,), PAD)
    ids = torch.stack([long, torch.cat([short, pad] if side == "right" else [pad, short])])
    mask = (torch.arange(14) < 8) if side == "right" else (torch.arange(14) >= 6)
    mask = torch.stack([torch.ones(14, dtype=torch.bool), mask]).long()  # (2, 14)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' forward counts from 0 regardless
    ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    ours = ours_fp32(ids, attention_mask=mask)
    real = mask.bool()
    check_close(ours[real], ref[real])
    check_close(ours[1][real[1]], hf(short[None]).logits[0])
    if side == "right":  # the documented shortcut: no mask at all for right padding
        check_close(ours_fp32(ids)[real], ref[real])


def test_sharded_checkpoint_from_transformers(ckpt, tmp_path):
    _, hf, _ = ckpt
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    ids = random_ids(2, 16)
    with torch.no_grad():
        check_close(M.load_pretrained(tmp_path)(ids), hf(ids).logits)


# ----------------------------------------------------------------------------------------------
# Generation


def hf_greedy(hf, prompts, max_new_tokens, eos_token_id=None, prefix=None):
    """transformers' generate(do_sample=False) on left-padded prompts; new tokens per row, cut after EOS."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=PAD)
    hf.generation_config.eos_token_id = None  # else the config's EOS would stop rows we let run
    if prefix is None:
        new = hf.generate(ids, attention_mask=mask, **kwargs)[:, T:]
    else:  # [pad...] [emb(BOS)] [prefix] [emb(rest)]; generate() from embeddings returns only new tokens
        rows = []
        for p, e in zip(prompts, prefix):
            emb = hf.get_input_embeddings()(torch.tensor(p))  # (len(p), d)
            rows.append(torch.cat([torch.zeros(T - len(p), e.shape[-1]), emb[:1], e, emb[1:]]))
        n = prefix.shape[1]
        mask = torch.tensor([[0] * (T - len(p)) + [1] * (len(p) + n) for p in prompts])
        new = hf.generate(inputs_embeds=torch.stack(rows), attention_mask=mask, **kwargs)
    out = []
    for row in new.tolist():
        out.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return out


PROMPTS = {"single": [[BOS, 5, 7, 9, 11]], "batch": [[BOS, 5, 7, 9, 11, 13, 17], [BOS, 40], [BOS, 3, 60, 61]]}


@pytest.mark.parametrize("prompts", PROMPTS.values(), ids=PROMPTS.keys())
def test_greedy_generation_matches_transformers(ckpt, ours_fp32, prompts):
    _, hf, _ = ckpt
    ours = M.generate(ours_fp32, prompts, 12)
    assert ours == hf_greedy(hf, prompts, 12)
    assert all(len(row) == 12 for row in ours)
    assert len({tuple(row) for row in ours}) == len(ours)  # rows differ: padding/masks matter
    # EOS: make the token the first row produced at step 3 the EOS; that row stops there and keeps it
    eos = ours[0][3]
    stopped = M.generate(ours_fp32, prompts, 12, eos_token_id=eos)
    assert stopped == hf_greedy(hf, prompts, 12, eos_token_id=eos)
    assert stopped[0] == ours[0][: ours[0].index(eos) + 1] and len(stopped[0]) <= 4


@pytest.mark.parametrize("prompts", PROMPTS.values(), ids=PROMPTS.keys())
def test_prefix_generation_matches_transformers_inputs_embeds(ckpt, ours_fp32, prompts):
    _, hf, _ = ckpt
    prefix = STD * torch.randn(len(prompts), 3, 64, generator=torch.Generator().manual_seed(5))
    ours = M.generate(ours_fp32, prompts, 10, prefix_embeds=prefix)
    assert ours == hf_greedy(hf, prompts, 10, prefix=prefix)
    assert ours != M.generate(ours_fp32, prompts, 10)


@torch.no_grad()
def generate_without_cache(model, prompts, max_new_tokens, prefix_embeds=None, eos_token_id=None, **sampling):
    """What generate() must equal: each step recomputes the whole left-padded sequence, no KV cache."""
    seqs, out, done = [list(p) for p in prompts], [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        rows = []
        for b, s in enumerate(seqs):
            emb = model.tok_embeddings(torch.tensor(s))  # (len(s), d)
            rows.append(emb if prefix_embeds is None else torch.cat([emb[:1], prefix_embeds[b], emb[1:]]))
        T = max(len(r) for r in rows)
        x = torch.zeros(len(rows), T, rows[0].shape[-1])
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, T - len(r):], mask[b, T - len(r):] = r, 1
        token = M.sample_next(model(inputs_embeds=x, attention_mask=mask)[:, -1], **sampling).tolist()
        for b, t in enumerate(token):
            if not done[b]:
                out[b].append(t)
                done[b] = t == eos_token_id
            seqs[b].append(t)
        if all(done):
            break
    return out


# (temperature, top_k, top_p, soft prefix of 4 vectors or not)
SAMPLING = {
    "greedy": (0.0, None, None, False),
    "greedy_prefix": (0.0, None, None, True),
    "temperature": (1.5, None, None, False),
    "top_k_prefix": (1.0, 5, None, True),
    "top_p": (1.2, None, 0.8, False),
    "top_k_top_p_prefix": (0.9, 10, 0.9, True),
}


@pytest.mark.parametrize("setting", SAMPLING.values(), ids=SAMPLING.keys())
def test_kv_cache_generation_equals_recomputation(ckpt, ours_fp32, setting):
    temperature, top_k, top_p, with_prefix = setting
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    prompts = PROMPTS["batch"]
    prefix = STD * torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(6)) if with_prefix else None
    eos = 7  # may or may not come up; both paths must agree either way
    ours = M.generate(ours_fp32, prompts, 10, prefix_embeds=prefix, eos_token_id=eos,
                      generator=torch.Generator().manual_seed(0), **sampling)
    ref = generate_without_cache(ours_fp32, prompts, 10, prefix_embeds=prefix, eos_token_id=eos,
                                 generator=torch.Generator().manual_seed(0), **sampling)
    assert ours == ref
    if temperature > 0:  # it does sample
        assert ours != M.generate(ours_fp32, prompts, 10, prefix_embeds=prefix, eos_token_id=eos)


@torch.no_grad()
def test_cached_forward_in_chunks_equals_one_full_forward(ckpt, ours_fp32):
    """Feeding 9, then 1, then 4 tokens through a KVCache, with and without an attention mask, gives
    the logits of one forward over all 14 (the cache's causal mask is aligned to the end, not the start)."""
    ids = random_ids(2, 14, seed=12)
    full = ours_fp32(ids)
    for use_mask in (False, True):
        cache = M.KVCache(ours_fp32.config, 2, 14, torch.float32, "cpu")
        chunks = []
        for start, end in [(0, 9), (9, 10), (10, 14)]:
            mask = torch.ones(2, end, dtype=torch.long) if use_mask else None
            chunks.append(ours_fp32(ids[:, start:end], attention_mask=mask, cache=cache))
        check_close(torch.cat(chunks, dim=1), full)


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k=1", "top_p=1e-6"])
def test_degenerate_sampling_is_greedy(ckpt, ours_fp32, sampling):
    prompts = PROMPTS["batch"]
    sampled = M.generate(ours_fp32, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(0),
                         **sampling)
    assert sampled == M.generate(ours_fp32, prompts, 12)


def test_sampling_filters_match_transformers_warpers():
    """temperature, then top-k, then top-p, as transformers orders them: the same generator draws the
    same token from our filtered distribution as from theirs."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = 3 * torch.randn(256, 50, generator=torch.Generator().manual_seed(7))
    for temperature, top_k, top_p in [(0.7, None, None), (1.0, 5, None), (1.0, None, 0.7), (1.3, 8, 0.5)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p:
            ref = TopPLogitsWarper(top_p)(None, ref)
        theirs = torch.multinomial(ref.softmax(-1), 1, generator=torch.Generator().manual_seed(8)).squeeze(-1)
        ours = M.sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(8))
        assert torch.equal(ours, theirs), (temperature, top_k, top_p)


# ----------------------------------------------------------------------------------------------
# Training-time behaviour


def test_gradient_checkpointing_gives_the_same_gradients(ckpt):
    """Gradients of every parameter and of a soft prefix (the user embeddings), with and without."""
    model = M.load_pretrained(ckpt[2]).train()
    ids = random_ids(2, 16, seed=9)
    prefix = STD * torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(10))
    calls = []  # block forwards; forward hooks would not see checkpointing's recomputation

    def counted(forward):
        return lambda *args, **kwargs: (calls.append(1), forward(*args, **kwargs))[1]

    for block in model.layers:
        block.forward = counted(block.forward)

    def grads():
        model.zero_grad()
        u = prefix.clone().requires_grad_()
        emb = model.tok_embeddings(ids)
        x = torch.cat([emb[:, :1], u, emb[:, 1:]], dim=1)  # (B, 1 + 3 + 15, d)
        logits = model(inputs_embeds=x)[:, :-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), random_ids(2, 18, seed=11).flatten()).backward()
        return [u.grad] + [p.grad.clone() for p in model.parameters()]

    plain = grads()
    assert len(calls) == len(model.layers)
    model.set_grad_checkpointing(True)
    calls.clear()
    checkpointed = grads()
    assert len(calls) == 2 * len(model.layers)  # each block ran again in the backward pass
    for a, b in zip(plain, checkpointed):
        assert a.abs().max() > 0
        assert max_diff(a, b) <= 1e-6


# ----------------------------------------------------------------------------------------------
# Saving: what we write, transformers reads


@pytest.mark.parametrize("max_shard_bytes", [None, 30_000], ids=["single", "sharded"])
def test_saved_checkpoint_loads_in_transformers(ckpt, ours_fp32, tmp_path, max_shard_bytes):
    name, hf, _ = ckpt
    M.save_pretrained(ours_fp32, tmp_path, max_shard_bytes=max_shard_bytes)
    n_shards = len(list(tmp_path.glob("model-*-of-*.safetensors")))
    assert (n_shards > 2) == (max_shard_bytes is not None)
    assert (tmp_path / "model.safetensors").is_file() == (max_shard_bytes is None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(theirs) is type(hf)
    if name.startswith("llama"):  # transformers 5 keeps theta (and scaling) in rope_parameters
        assert theirs.config.rope_parameters["rope_theta"] == ours_fp32.config.rope_theta != 10000.0
        assert theirs.config.rope_parameters == hf.config.rope_parameters
    ids = random_ids(2, 40)
    with torch.no_grad():
        check_close(theirs(ids).logits, ours_fp32(ids))


def test_save_replaces_an_earlier_checkpoint_in_the_same_directory(tmp_path):
    cfg = M.ModelConfig(family="llama", vocab_size=50, hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=2,
                        head_dim=16, intermediate_size=64)
    first, second = M.build_model(cfg, seed=0), M.build_model(cfg, seed=1)
    M.save_pretrained(first, tmp_path, max_shard_bytes=2_000)
    M.save_pretrained(second, tmp_path)  # single file now: the old index and shards must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(M.load_pretrained(tmp_path).tok_embeddings.weight, second.tok_embeddings.weight)
    M.save_pretrained(first, tmp_path, max_shard_bytes=2_000)
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(M.load_pretrained(tmp_path).tok_embeddings.weight, first.tok_embeddings.weight)


# ----------------------------------------------------------------------------------------------
# bfloat16


# bf16 keeps 8 significant bits (rounding error up to 2^-9 = 0.2% per operation). Measured on these
# checkpoints (logits up to ~6.5): max abs diff 0.06-0.40 = 0.9-6.1% of max |logit|, mean abs diff
# 0.011-0.029 = 0.2-0.5%; transformers' own bf16 models drift exactly as much (LLaMA: bit-identical to ours).
# Tolerances, relative to max |fp32 logit|: max abs diff <= 10%, mean abs diff <= 1%, and no more than
# 1.5 x the drift of transformers' bf16 model on the same input.
BF16_MAX_TOL, BF16_MEAN_TOL = 0.10, 0.01


@torch.no_grad()
def test_bfloat16_forward_close_to_float32(ckpt, ours_fp32):
    _, hf, path = ckpt
    ours = M.load_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = random_ids(2, 40)
    ref = ours_fp32(ids)
    logits = ours(ids)
    assert logits.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    assert 0 < max_diff(logits, ref) <= BF16_MAX_TOL * scale  # > 0: it did compute in bf16
    assert (logits.float() - ref).abs().mean() <= BF16_MEAN_TOL * scale
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)(ids).logits
    assert max_diff(logits, ref) <= 1.5 * max_diff(theirs, hf(ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    """Normalised in float32 whatever the input dtype, then scaled: bit-identical to LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(13)
    ours, theirs = M.RMSNorm(64, 1e-6), LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.1 * torch.randn(64, generator=gen))
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (30 * torch.randn(4, 64, generator=gen)).to(dtype)
    assert torch.equal(ours(x), theirs(x))


# ----------------------------------------------------------------------------------------------
# config.json


def test_rope_theta_read_from_old_and_new_config_layouts(tmp_path):
    """transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; older files (Llama 3.1 on the
    Hub) have rope_theta at the top level and the scaling in rope_scaling. Both give the same config,
    and the old layout loads into the same model."""
    hf = tiny_llama(tmp_path / "new", std=STD, **CASES["llama31"][1])
    new = json.loads((tmp_path / "new" / "config.json").read_text())
    assert new["rope_parameters"]["rope_theta"] == 50000.0 and "rope_theta" not in new
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old["rope_theta"] = new["rope_parameters"]["rope_theta"]
    old["rope_scaling"] = {k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"}
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    cfg_new, cfg_old = M.read_config(tmp_path / "new"), M.read_config(tmp_path / "old" / "config.json")
    assert cfg_old == cfg_new
    assert cfg_new.rope_theta == 50000.0 and cfg_new.rope_scaling["rope_type"] == "llama3"
    ids = random_ids(1, 40)
    with torch.no_grad():
        check_close(M.load_pretrained(tmp_path / "old")(ids), hf(ids).logits)
    # no theta anywhere: LLaMA's default 10000
    plain = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    assert M.ModelConfig.from_hf(plain).rope_theta == 10000.0 and M.ModelConfig.from_hf(plain).rope_scaling is None


# ----------------------------------------------------------------------------------------------
# Errors a person can act on


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_errors")
    tiny_llama(path)
    return path


def broken_copy(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint, editing its tensors dict (name -> tensor) before saving it again."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


BROKEN = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
                ["missing", "model.layers.1.mlp.up_proj.weight"]),
    "unexpected": (lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}),
                   ["unexpected", "model.layers.0.self_attn.extra.weight"]),
    "wrong_shape": (lambda t: t.update({"model.norm.weight": torch.ones(63)}),
                    ["wrong shape", "model.norm.weight", "(63,)", "(64,)"]),
}


@pytest.mark.parametrize("kind", [*BROKEN, "all_three"])
def test_mismatched_tensors_are_listed_in_one_error(llama_dir, tmp_path, kind):
    kinds = list(BROKEN) if kind == "all_three" else [kind]

    def edit(tensors):
        for k in kinds:
            BROKEN[k][0](tensors)

    path = broken_copy(llama_dir, tmp_path / "broken", edit)
    with pytest.raises(ValueError) as err:
        M.load_pretrained(path)
    for k in kinds:
        for fragment in BROKEN[k][1]:
            assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_model_type_names_the_supported_ones(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "ckpt")
    cfg = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"'mistral'.*supported: llama, gptj"):
        M.load_pretrained(tmp_path / "ckpt")


def test_config_json_with_a_byte_order_mark_loads(llama_dir, tmp_path):
    shutil.copy(llama_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + (llama_dir / "config.json").read_bytes())
    assert M.read_config(tmp_path / "config.json") == M.read_config(llama_dir / "config.json")


def test_missing_config_json(llama_dir, tmp_path):
    shutil.copy(llama_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused_and_never_unpickled(llama_dir, tmp_path, monkeypatch):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    torch.save(load_file(llama_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle file was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    with pytest.raises(FileNotFoundError, match="pickle checkpoints like pytorch_model.bin are never loaded"):
        M.load_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# Memory: loading allocates the weights once, in the target dtype

PEAK_SCRIPT = textwrap.dedent("""
    import gc, sys, torch
    import model as M

    def status_bytes(key):  # VmRSS: resident now; VmHWM: peak resident since the last reset
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024  # reported in kB

    M.load_pretrained(sys.argv[2], dtype=torch.bfloat16)  # warm up imports and first-call allocations
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current resident size
    except OSError:
        sys.exit(print("unsupported"))
    before = status_bytes("VmRSS")
    if sys.argv[3] == "load_pretrained":
        model = M.load_pretrained(sys.argv[1], dtype=torch.bfloat16)
    else:  # the control: build in float32, then cast (a second, full float32 copy)
        model = M.Transformer(M.read_config(sys.argv[1])).to(torch.bfloat16)
    print(status_bytes("VmHWM") - before)
""")


def test_loading_in_bfloat16_never_holds_a_float32_copy(tmp_path):
    """Loading a 28.3M-parameter float32 checkpoint (108 MiB, in 4 MiB shards) as bfloat16 (54 MiB) raises
    the peak resident memory by less than bf16 + a quarter of a float32 copy (81 MiB; measured ~63: the
    weights, one mapped shard, one float32 tensor in flight). The control, building the model in float32
    and casting it, measured the same way, needs ~110 MiB: the measurement can fail."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak resident set size")
    cfg = M.ModelConfig(family="llama", vocab_size=1000, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=8,
                        head_dim=64, intermediate_size=1536)
    model = M.build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    M.save_pretrained(model, tmp_path / "medium", max_shard_bytes=4 << 20)
    tiny = replace(cfg, n_layers=1, hidden_size=64, head_dim=8, intermediate_size=64)
    M.save_pretrained(M.build_model(tiny), tmp_path / "warm")
    del model
    procs = {how: subprocess.Popen([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "medium"),
                                    str(tmp_path / "warm"), how], cwd=Path(M.__file__).parent,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for how in ("load_pretrained", "control")}
    peak = {}
    for how, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        if out.strip() == "unsupported":
            pytest.skip("cannot reset the peak resident set size here")
        peak[how] = int(out)
    bound = 2 * n_params + 4 * n_params // 4  # bf16 weights + a quarter of a float32 copy
    assert peak["load_pretrained"] < bound, f"peak {peak['load_pretrained'] / 2**20:.0f} MiB"
    assert peak["control"] > bound, f"control peak {peak['control'] / 2**20:.0f} MiB: measurement too coarse"


def test_generation_constraints_by_hand():
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens as Hugging Face defines them."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    out = M.constrain_logits(logits, [[0, 1, 0]], False, {4}, 2.0, 0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, 1.0]]  # seen tokens 0, 1: positive / 2, negative * 2
    out = M.constrain_logits(logits, [[3, 2, 3]], False, {4}, 1.0, 2)
    assert out[0, 2] == -float("inf") and torch.isfinite(out[0, [0, 1, 3, 4]]).all()  # "3 2" would repeat
    out = M.constrain_logits(logits, [[3]], True, {4}, 1.0, 0)
    assert out[0, 4] == -float("inf") and torch.equal(out[0, :4], logits[0, :4])  # EOS forbidden
