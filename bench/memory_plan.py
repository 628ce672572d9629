"""Memory plan: will a P-DPO run of train.py fit on one GPU? Parameters, then a budget, from a config.json.

    python bench/memory_plan.py --model bench/configs/gpt-j-6b.json --batch 2 --max-length 1024 --n-user-tokens 1
    python bench/memory_plan.py --model bench/configs/llama-7b.json --lora-r 8 --grad-checkpointing
    python bench/memory_plan.py --validate          # the estimator against measured saved tensors and peaks (CPU)

The model is built on the meta device (model.read_config + Transformer under torch.device("meta"); LoRA
through lora.add_lora), so parameters are counted exactly and nothing is allocated. The budget follows
train.py's conventions:
  full fine-tuning, --precision bf16: fp32 weights (they are the master weights), bf16 autocast; the bf16
      copies autocast makes of every Linear weight are kept by autograd for the backward pass (2 bytes per
      Linear parameter) unless the block is checkpointed; fp32 gradients; AdamW m and v in fp32.
  LoRA, --precision bf16: the base model in bf16 and frozen; adapters (and the user model) in fp32, trained
      with fp32 gradients and AdamW states.
  reference model: none with LoRA (the same weights, adapters off); none with --precompute-reference (the
      default: log-probs computed once before training); else a frozen fp32 copy (--no-precompute-reference).
  activations: the tensors autograd saves for the backward pass, counted per layer and per token from what
      each operation of model.py / prlhf.py saves (derived op by op and checked with saved_tensors_hooks:
      `--validate`), for P-DPO's 4B rows (chosen/rejected x personalized/generic) of max_length + T_u tokens
      (vanilla DPO: 2B rows); plus the log-softmax of the response positions in fp32 (prlhf.response_logps
      applies the LM head only there); plus the backward pass's working memory on top (the gradient of the
      logits, or one recomputed block with --grad-checkpointing).
Not counted: the CUDA context and allocator fragmentation (plan on 1-2 GiB), the data, the tokenizer.
Rows are assumed padded to max_length and responses as long as they can be (max_length - 2 tokens), the
worst case of a batch; the totals are upper bounds in that sense.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

import torch

import common as C
import model as lm

GiB = 2**30
GPUS = {"A100 40GB": 40e9, "A100 80GB": 80e9}  # bytes; "40GB" is 40 * 10^9 (39.8 GiB addressable, less the context)
CONTEXT_BYTES = 1.5 * GiB  # CUDA context + allocator slack, kept free when stating a fit
LORA_TARGETS = "wq,wk,wv,wo,w1,w2,w3,tok_embeddings"  # train.py's default --lora-targets


# ----------------------------------------------------------------------------------------------
# Parameters, counted on the meta device


@dataclass
class Params:
    total: int  # every parameter of the LM (LoRA adapters excluded)
    linear: int  # weights of nn.Linear layers (what autocast casts to bf16), LM head included
    lora: int  # adapter parameters (0 for full fine-tuning)
    user: int  # user-model parameters (trained in full, fp32)


def count_parameters(cfg: lm.ModelConfig, lora_r: int, n_users: int, n_user_tokens: int) -> Params:
    from lora import add_lora

    with torch.device("meta"):
        model = lm.Transformer(cfg)
        total = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        lora = 0
        if lora_r:
            add_lora(model, lora_r, 16.0, 0.05, LORA_TARGETS.split(","))
            lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    user = (n_users + 1) * n_user_tokens * cfg.hidden_size  # individual user model: e_0 and o_1..o_N
    return Params(total, linear, lora, user)


# ----------------------------------------------------------------------------------------------
# Activations: bytes autograd saves, per layer and per token, for our model.py
#
# mode "fp32": everything fp32 (what --validate can run fast on a CPU); "bf16": full fine-tuning with fp32
# weights under bf16 autocast; "lora": bf16 base weights, fp32 adapters, bf16 autocast. Symbols: d hidden,
# h intermediate, q = n_heads * head_dim, kv = n_kv_heads * head_dim, hs head_dim, nh n_heads, r LoRA rank.


def block_bytes_per_token(cfg: lm.ModelConfig, mode: str, r: int = 0, lora_dropout: bool = True) -> float:
    """What one transformer block saves for backward, per token (one row position), in bytes.

    lora_dropout: train.py's --lora-dropout > 0. Each adapter then keeps its own dropout mask and dropped
    input; at 0 the dropout is the identity and adapters sharing an input (wq, wk, wv) share what they keep.
    """
    d, h, hs, nh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.n_heads
    q, kv = nh * hs, cfg.n_kv_heads * hs
    a = 4 if mode == "fp32" else 2  # bytes of a linear layer's output
    sdpa = a * (2 * q + 2 * kv) + 4 * nh  # q, k, v, output, and the fp32 log-sum-exp per head

    def lora(k):  # an adapter on a linear of input width k: dropout mask, dropped input, A's output
        return 4 * k + 2 * r

    if cfg.family == "llama":
        if mode == "lora":  # frozen base linears save nothing of their inputs; the adapters do
            norms = 2 * (4 * d + 4)  # each RMSNorm: its input upcast to fp32, and rsqrt
            adapters = 3 * lora(d) + lora(q) + 2 * lora(d) + lora(h)  # wq wk wv, wo, w1 w3, w2
            if not lora_dropout:  # the two norms' outputs and w2's input; wo's input is SDPA's output
                adapters = 2 * d + 2 * d + 2 * h + 7 * 2 * r
            return norms + 4 * 2 * hs + sdpa + 3 * 2 * h + adapters  # cos/sin (x4), MLP: w1 x, silu, w3 x
        norms = 2 * (8 * d + 4)  # each RMSNorm: fp32 input, rsqrt, normalized x (for the norm's weight)
        inputs = 2 * 4 * d if mode == "fp32" else (3 + 2) * 2 * d  # linear inputs; autocast casts once per linear
        mlp = 4 * a * h  # w1 x, silu(w1 x), w3 x, and their product (w2's input)
        return norms + inputs + 4 * 4 * hs + sdpa + mlp  # cos/sin are fp32 (the residual stream's dtype)
    # GPT-J: one LayerNorm feeds attention and MLP in parallel; wo's input is a copy (transpose + reshape)
    if mode == "lora":
        adapters = 3 * lora(d) + lora(q) + lora(d) + lora(h)  # wq wk wv, wo, w1, w2
        if not lora_dropout:  # the LayerNorm's output, wo's input copy, gelu's output
            adapters = 2 * d + 2 * q + 2 * h + 6 * 2 * r
        return (2 * d + 4) + sdpa + 2 * h + adapters  # LayerNorm: input, mean, rstd (bf16); gelu's input
    norm = 4 * d + 8  # LayerNorm: fp32 input, mean, rstd
    inputs = 4 * d if mode == "fp32" else 4 * 2 * d  # one shared fp32 input, or one bf16 cast per linear
    return norm + inputs + sdpa + a * q + 2 * a * h  # wo's input copy; MLP: fc_in x, gelu(fc_in x)


def block_input_bytes_per_token(cfg: lm.ModelConfig, mode: str) -> float:
    """With --grad-checkpointing a block keeps only its input: the residual stream (fp32 unless LoRA-bf16)."""
    return (2 if mode == "lora" else 4) * cfg.hidden_size


def head_bytes(cfg: lm.ModelConfig, mode: str, r: int, tokens: int, response_tokens: int) -> float:
    """Outside the blocks: embedding indices, final norm, LM head input and fp32 logits at response positions."""
    d, V = cfg.hidden_size, cfg.vocab_size
    per_token = 8 + 2  # int64 ids kept by the embedding; boolean response masks of response_logps
    if mode == "lora":
        per_token += 4 * r  # the embedding adapter's (t, r) output
        per_token += (4 * d + 4) if cfg.family == "llama" else (2 * d + 4)  # final norm
        head_input = 0  # frozen LM head: its input is not kept
    else:
        per_token += (8 * d + 4) if cfg.family == "llama" else (4 * d + 8)
        head_input = 4 * d if mode == "fp32" else 2 * d
    per_response = head_input + 4 * V + 4 + 8  # logits in fp32 (logsumexp keeps them), its result, targets
    return per_token * tokens + per_response * response_tokens


def rotary_table_bytes_per_token(cfg: lm.ModelConfig, mode: str, grad_checkpointing: bool) -> float:
    """cos and sin (rotary_dims / 2 each, in the residual stream's dtype), kept once for all blocks: by
    GPT-J's rotation always, by LLaMA's only as checkpoint inputs (its blocks keep their own copies)."""
    if cfg.family == "llama" and not grad_checkpointing:
        return 0
    rotary_dims = cfg.rotary_dim if cfg.family == "gptj" else cfg.head_dim
    return (2 if mode == "lora" else 4) * rotary_dims


def lora_adapter_casts(cfg: lm.ModelConfig, r: int) -> float:
    """LoRALinear casts A and B to the activation dtype; autograd keeps the bf16 copies (per layer)."""
    d, h, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, h), (h, d)] + ([(d, h)] if cfg.family == "llama" else [])
    return 2 * r * sum(i + o for i, o in shapes) * cfg.n_layers


@dataclass
class Activations:
    saved: float  # bytes autograd holds between forward and backward
    peak: float  # saved + the backward pass's working memory


def activations(cfg: lm.ModelConfig, params: Params, mode: str, *, rows: int, row_tokens: int, response_tokens: int,
                grad_checkpointing: bool, lora_r: int = 0, lora_dropout: bool = True) -> Activations:
    """Activation memory of one micro-batch: `rows` sequences of `row_tokens`, `response_tokens` scored per row."""
    t, n = rows * row_tokens, rows * response_tokens
    r = lora_r if mode == "lora" else 0
    one_block = block_bytes_per_token(cfg, mode, r, lora_dropout) * t
    head = head_bytes(cfg, mode, r, t, n) + rotary_table_bytes_per_token(cfg, mode, grad_checkpointing) * t
    weight_copies = 2 * params.linear if mode == "bf16" else 0  # autocast's bf16 weights, kept for backward
    adapter_copies = lora_adapter_casts(cfg, r) if mode == "lora" else 0
    # backward through the log-softmax, while the saved fp32 logits are still held: the logits' gradient,
    # the softmax and the gather's scattered gradient, three fp32 (n, V) buffers (measured: --validate-peak)
    logits_grad = 12 * cfg.vocab_size * n
    if not grad_checkpointing:
        saved = cfg.n_layers * one_block + head + weight_copies + adapter_copies
        working = max(logits_grad, one_block)  # at the logits, or one block's gradients
        return Activations(saved, saved + working)
    lm_head_copy = 2 * cfg.vocab_size * cfg.hidden_size if mode == "bf16" else 0
    saved = cfg.n_layers * block_input_bytes_per_token(cfg, mode) * t + head + lm_head_copy
    # backward: one block recomputed (its saved tensors, its weight casts) and its gradients
    block_weights = 2 * (params.linear - cfg.vocab_size * cfg.hidden_size) / cfg.n_layers if mode == "bf16" else 0
    working = max(logits_grad, 2 * one_block + block_weights)
    forward_end = saved + weight_copies  # autocast's cache lives until the forward's autocast block ends
    return Activations(saved, max(saved + working, forward_end))


# ----------------------------------------------------------------------------------------------
# The budget


def budget(cfg: lm.ModelConfig, *, lora_r: int, batch: int, max_length: int, n_user_tokens: int, n_users: int,
           grad_checkpointing: bool, objective: str = "pdpo", response_length: int | None = None,
           precompute_reference: bool = True, precision: str = "bf16", lora_dropout: float = 0.05) -> dict:
    """Bytes per component for one GPU running train.py with these settings."""
    params = count_parameters(cfg, lora_r, n_users, n_user_tokens)
    lora = lora_r > 0
    mode = "lora" if lora else ("bf16" if precision == "bf16" else "fp32")
    rows = (4 if objective == "pdpo" else 2) * batch  # chosen/rejected x (personalized, generic)
    row_tokens = max_length + (n_user_tokens if objective == "pdpo" else 0)
    response = response_length if response_length is not None else max_length - 2
    act = activations(cfg, params, mode, rows=rows, row_tokens=row_tokens, response_tokens=response,
                      grad_checkpointing=grad_checkpointing, lora_r=lora_r, lora_dropout=lora_dropout > 0)
    trainable = (params.lora if lora else params.total) + params.user
    weights = (2 * params.total + 4 * params.lora if lora else 4 * params.total) + 4 * params.user
    reference = 0 if (lora or precompute_reference) else 4 * params.total
    out = {"weights": weights, "gradients (fp32)": 4 * trainable, "AdamW m, v (fp32)": 8 * trainable,
           "reference model": reference, "activations, saved": act.saved,
           "working memory (peak - saved)": act.peak - act.saved}
    out["total"] = sum(out.values())
    return {"bytes": out, "params": params, "trainable": trainable, "mode": mode, "rows": rows,
            "row_tokens": row_tokens, "response_tokens": response}


def fits(total: float) -> str:
    ok = [name for name, cap in GPUS.items() if total + CONTEXT_BYTES <= cap]
    return ", ".join(ok) if ok else "neither"


# ----------------------------------------------------------------------------------------------
# Validation: estimator against measurement on CPU


def measure_saved_bytes(cfg: lm.ModelConfig, mode: str, *, batch: int, seq: int, n_user_tokens: int,
                        grad_checkpointing: bool, lora_r: int = 8, lora_dropout: float = 0.05) -> tuple[float, dict]:
    """Bytes of distinct tensors autograd saves during one P-DPO policy forward (parameters excluded)."""
    import prlhf
    from lora import add_lora

    torch.manual_seed(0)
    model = lm.build_model(cfg, dtype=torch.bfloat16 if mode == "lora" else torch.float32)
    if mode == "lora":
        add_lora(model, lora_r, 16.0, lora_dropout, LORA_TARGETS.split(","))
    model.set_grad_checkpointing(grad_checkpointing)
    model.train()
    user_model = prlhf.make_user_model("individual", 4, n_user_tokens, cfg.hidden_size, init="uniform")
    batch_ = synthetic_batch(cfg, batch, seq)
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *user_model.parameters()]}
    seen = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return x

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), autocast:
        logps = prlhf.policy_logps(model, user_model, batch_, alpha=0.5)
    del logps
    rows, n_resp = 4 * batch, int(batch_["policy_response_mask"][:, 1:].sum()) * 2
    return float(sum(seen.values())), {"rows": rows, "response_tokens_total": n_resp}


def synthetic_batch(cfg: lm.ModelConfig, batch: int, seq: int) -> dict:
    """B pairs of `seq` tokens, the second half of each row the response (no padding)."""
    ids = torch.randint(3, cfg.vocab_size, (2 * batch, seq))
    mask = torch.zeros(2 * batch, seq, dtype=torch.bool)
    mask[:, seq // 2:] = True
    return {"policy_input_ids": ids, "policy_response_mask": mask, "user_rows": torch.arange(1, batch + 1) % 5}


def estimate_saved(cfg, mode, *, batch, seq, n_user_tokens, grad_checkpointing, lora_r=8, lora_dropout=0.05) -> float:
    params = count_parameters(cfg, lora_r if mode == "lora" else 0, 4, n_user_tokens)
    response = seq - seq // 2  # positions t that predict a response token, per row
    act = activations(cfg, params, mode, rows=4 * batch, row_tokens=seq + n_user_tokens,
                      response_tokens=response, grad_checkpointing=grad_checkpointing, lora_r=lora_r,
                      lora_dropout=lora_dropout > 0)
    return act.saved


VALIDATION_MODELS = {
    "tiny llama (d 64, h 176, 2 layers)": dict(family="llama", hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                               head_dim=16, intermediate_size=176, vocab_size=300),
    "small llama (d 256, h 688, 4 layers)": dict(family="llama", hidden_size=256, n_layers=4, n_heads=4,
                                                 n_kv_heads=4, head_dim=64, intermediate_size=688, vocab_size=2000),
    "tiny gpt-j (d 64, h 256, 2 layers)": dict(family="gptj", hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                               head_dim=16, intermediate_size=256, rotary_dim=8, vocab_size=300),
    "small gpt-j (d 256, h 1024, 4 layers)": dict(family="gptj", hidden_size=256, n_layers=4, n_heads=4,
                                                  n_kv_heads=4, head_dim=64, intermediate_size=1024, rotary_dim=16,
                                                  vocab_size=2000),
}


def validate(quick: bool = False) -> dict:
    """Saved-tensor bytes: estimate vs saved_tensors_hooks, for each model x mode x checkpointing."""
    rows, errors = [], []
    models = dict(list(VALIDATION_MODELS.items())[:1]) if quick else VALIDATION_MODELS
    for name, kw in models.items():
        cfg = lm.ModelConfig(**kw)
        for mode, dropout in (("fp32", 0), ("bf16", 0), ("lora", 0.05), ("lora", 0.0)):
            for ckpt in (False, True):
                shape = dict(batch=2, seq=48 if quick else 96, n_user_tokens=1, grad_checkpointing=ckpt)
                if mode == "lora":
                    shape["lora_dropout"] = dropout
                measured, _ = measure_saved_bytes(cfg, mode, **shape)
                estimated = estimate_saved(cfg, mode, **shape)
                err = estimated / measured - 1
                errors.append(abs(err))
                label = f"lora, dropout {dropout}" if mode == "lora" else mode
                rows.append([name, label, "on" if ckpt else "off", f"{measured / 2**20:.2f}",
                             f"{estimated / 2**20:.2f}", f"{100 * err:+.1f}%"])
    C.print_table(["model", "mode", "checkpointing", "measured MiB", "estimated MiB", "error"], rows,
                  title="saved activations of one P-DPO policy forward (B=2, 4B rows), "
                        "estimate vs torch.autograd.graph.saved_tensors_hooks")
    figures = {"saved_max_abs_error": round(max(errors), 4),
               "saved_mean_abs_error": round(sum(errors) / len(errors), 4)}
    figures.update(validate_peak(quick))
    return figures


def validate_peak(quick: bool) -> dict:
    """Peak of a whole P-DPO step (forward + backward) above the memory held before it, in a fresh process per
    measurement (bench/grad_checkpointing.py's worker: CPU resident memory, or CUDA max_memory_allocated)."""
    from pathlib import Path

    worker = Path(__file__).with_name("grad_checkpointing.py")
    shapes = [dict(layers=2, hidden=64, heads=4, vocab=2000, batch=2, seq=128)]
    if not quick:
        shapes.append(dict(layers=4, hidden=256, heads=4, vocab=8000, batch=2, seq=256))
    rows, errors = [], []
    for shape in shapes:
        cfg = C.llama_config(layers=shape["layers"], hidden=shape["hidden"], heads=shape["heads"], vocab=shape["vocab"])
        params = count_parameters(cfg, 0, 4, 1)
        for ckpt in ("off", "on"):
            argv = ["--peak-worker", ckpt, "--precision", "fp32"] + [f"--{k}={v}" for k, v in shape.items()]
            measured = C.run_worker(worker, argv)["peak_mb"] * 2**20
            est = activations(cfg, params, "fp32", rows=4 * shape["batch"], row_tokens=shape["seq"] + 1,
                              response_tokens=shape["seq"] - shape["seq"] // 2, grad_checkpointing=ckpt == "on").peak
            errors.append(est / measured - 1)
            rows.append([f"llama d {shape['hidden']}, {shape['layers']} layers, vocab {shape['vocab']}, "
                         f"{4 * shape['batch']} x {shape['seq'] + 1} tokens", ckpt, f"{measured / 2**20:.1f}",
                         f"{est / 2**20:.1f}", f"{100 * errors[-1]:+.1f}%"])
    C.print_table(["model (fp32, exact P-DPO step)", "checkpointing", "measured peak MiB", "estimated MiB", "error"],
                  rows, title="peak above weights and gradients, estimate vs measurement in a fresh process")
    return {"peak_max_abs_error": round(max(abs(e) for e in errors), 4),
            "peak_errors": [round(e, 4) for e in errors]}


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/configs/gpt-j-6b.json", help="a config.json (or checkpoint directory)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the LoRA column (the paper: 8)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="train.py's --lora-dropout (the paper: 0.05)")
    p.add_argument("--batch", type=int, default=2, help="pairs per micro-batch (B; the paper: 2)")
    p.add_argument("--max-length", type=int, default=1024, help="max tokens of [BOS] prompt response")
    p.add_argument("--response-length", type=int, default=None,
                   help="response tokens scored per row (default: max_length - 2, the worst case)")
    p.add_argument("--n-user-tokens", type=int, default=1, help="T_u")
    p.add_argument("--n-users", type=int, default=10, help="known users N (user-model size; tiny either way)")
    p.add_argument("--objective", default="pdpo", choices=["pdpo", "dpo"], help="pdpo: 4B rows; dpo: 2B rows")
    p.add_argument("--grad-checkpointing", action="store_true", help="show only the checkpointed columns")
    p.add_argument("--no-precompute-reference", action="store_true",
                   help="full fine-tuning keeps a frozen fp32 reference copy instead of precomputed log-probs")
    p.add_argument("--validate", action="store_true", help="check the estimator against measurements, then exit")
    p.add_argument("--quick", action="store_true", help="with --validate: one tiny model only")
    return p.parse_args(argv)


def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def main(argv=None):
    args = parse_args(argv)
    if args.validate:
        figures = validate(quick=args.quick)
        print(f"\nsaved-activation estimate: max |error| {100 * figures['saved_max_abs_error']:.1f}%, "
              f"mean {100 * figures['saved_mean_abs_error']:.1f}%; peak estimate: max |error| "
              f"{100 * figures['peak_max_abs_error']:.1f}%")
        C.emit_json(figures)
        return figures
    cfg = lm.read_config(args.model)
    columns = []
    for lora_r in (0, args.lora_r):
        for ckpt in ((True,) if args.grad_checkpointing else (False, True)):
            b = budget(cfg, lora_r=lora_r, batch=args.batch, max_length=args.max_length,
                       n_user_tokens=args.n_user_tokens, n_users=args.n_users, grad_checkpointing=ckpt,
                       objective=args.objective, response_length=args.response_length,
                       precompute_reference=not args.no_precompute_reference, lora_dropout=args.lora_dropout)
            name = (f"LoRA r={lora_r}" if lora_r else "full FT") + (" + ckpt" if ckpt else "")
            columns.append((name, b))
    p = columns[0][1]["params"]
    first = columns[0][1]
    print(f"memory_plan: {args.model}: {cfg.family}, {p.total:,} parameters ({p.total / 1e9:.2f} B); "
          f"{args.objective.upper()} batch {args.batch} -> {first['rows']} rows x {first['row_tokens']} tokens "
          f"(max_length {args.max_length} + T_u {args.n_user_tokens if args.objective == 'pdpo' else 0}), "
          f"{first['response_tokens']} response tokens scored per row; bf16")
    print("trainable parameters: " + "; ".join(f"{n}: {b['trainable']:,}" for n, b in columns))
    keys = list(columns[0][1]["bytes"])
    rows = [[k] + [gib(b["bytes"][k]) for _, b in columns] for k in keys]
    rows.append([f"fits (+{CONTEXT_BYTES / GiB:.1f} GiB context)"] + [fits(b["bytes"]["total"]) for _, b in columns])
    C.print_table(["GiB"] + [n for n, _ in columns], rows)
    figures = {"model": args.model, "parameters": p.total,
               **{f"{n} trainable": b["trainable"] for n, b in columns},
               **{f"{n} total_gib": round(b["bytes"]["total"] / GiB, 2) for n, b in columns},
               **{f"{n} activations_gib": round((b["bytes"]["activations, saved"]
                                                 + b["bytes"]["working memory (peak - saved)"]) / GiB, 2)
                  for n, b in columns},
               **{f"{n} fits": fits(b["bytes"]["total"]) for n, b in columns}}
    C.emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
