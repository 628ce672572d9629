"""Profile train.py's P-DPO training step with torch.profiler: where does a step's time go?

    python bench/profile_step.py                  # small LLaMA (4 layers, d 256), exact P-DPO, B=4, 8 profiled steps
    python bench/profile_step.py --alpha 1 --n-user-tokens 0 --user-model uniform    # vanilla DPO
    python bench/profile_step.py --quick

The step is train.py's own: collate (data.collate_pairs), prlhf.pdpo_step (prlhf.policy_logps: one
forward of 4B rows; reference log-probs from cache.reference_cache, as train.py precomputes them), backward,
clipping, AdamW, on
toy pairs of varied length batched by data.make_batches. The table lists the operators by self time, then
groups them: matrix multiplies, attention, the LM head's log-softmax, element-wise and copies, indexing
(AdamW's per-parameter updates are element-wise operators too: the phase table shows the optimizer apart);
"outside operators" is the step's wall time not spent in any operator (Python, the profiler).
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import common as C
from examples import toy as toy_tasks
import data
import model as lm
import cache
import prlhf
from pdpo_vs_trl import make_pairs

GROUPS = {  # operator name fragments -> group, first match wins
    "attention (SDPA)": ("scaled_dot_product", "flash_attention", "_efficient_attention", "sdpa"),
    "matrix multiplies": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "gemm"),
    "log-softmax / logsumexp": ("logsumexp", "log_softmax", "_softmax", "aten::exp"),
    "optimizer (AdamW)": ("adam", "_foreach", "clip_grad", "aten::norm", "linalg_vector_norm"),
    "indexing / gather / scatter": ("index", "gather", "scatter", "masked", "nonzero", "embedding"),
    "copies and casts": ("copy_", "aten::to", "_to_copy", "clone", "contiguous", "aten::cat", "aten::stack"),
    "element-wise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "silu", "gelu", "rsqrt", "pow", "mean",
                     "neg", "aten::sum", "sigmoid", "aten::where", "fill_", "zero_", "aten::cos", "aten::sin"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(p, layers=4, hidden=256, heads=4, vocab=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--user-model", default="individual")
    p.add_argument("--n-user-tokens", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--top", type=int, default=25, help="operators listed")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.vocab, args.steps, args.top = 1, 32, 300, 2, 10
    return args


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    return "other operators"


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="profile_step-"))
    tokenizer = data.train_bpe_tokenizer(toy_tasks.toy_corpus_texts(0, n_examples=2000), args.vocab, out_dir=work / "base")
    cfg = C.llama_config(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=tokenizer.vocab_size,
                         max_positions=4096)
    pairs = make_pairs(args.batch_size * (args.steps + 2), max_sentences=8)
    items, _ = data.tokenize_pairs(pairs, tokenizer, max_length=100_000, max_prompt_length=50_000)
    pcfg = prlhf.PDPOConfig(user_model=args.user_model, n_user_tokens=args.n_user_tokens, alpha=args.alpha, beta=0.1)
    model = lm.build_model(cfg, device=device).train()
    registry = prlhf.UserRegistry.from_users(p.user for p in pairs)
    user_model = prlhf.make_user_model(args.user_model, len(registry) - 1, args.n_user_tokens, cfg.hidden_size,
                                       token_embedding=model.tok_embeddings.weight).to(device)

    def collate(chunk):
        b = data.collate_pairs(chunk, tokenizer, registry.row, use_user_text=False)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    autocast = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def online(batch):  # pi_ref = the starting model, in eval mode, as train.py's precompute
        model.eval()
        logps = prlhf.reference_logps(model, batch, average=pcfg.average_logps)
        model.train()
        return logps

    reference = cache.reference_cache(online, {"train": items}, collate, batch_size=max(args.batch_size, 8),
                                           autocast=autocast)
    params = [*model.parameters(), *user_model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = data.make_batches(items, args.batch_size, shuffle=True, seed=0)

    def step(idx):  # phases labelled for the profiler; the work is train.py's
        with record_function("phase: collate"):
            batch = collate([items[i] for i in idx])
        with record_function("phase: forward + loss"), autocast:
            loss = prlhf.pdpo_step(model, user_model, batch, reference, pcfg)["losses"].mean()
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: clip + AdamW"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for idx in batches[:2]:
        step(idx)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    import time
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for idx in batches[2:2 + args.steps]:
            step(idx)
        C.sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    use_cuda = device.startswith("cuda")
    key = "self_device_time_total" if use_cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) / 1e6
    print(f"profile_step: {args.steps} steps of {'exact P-DPO' if 0 < args.alpha < 1 else 'DPO'} (alpha {args.alpha}, "
          f"{args.user_model}, T_u {args.n_user_tokens}), B={args.batch_size}, LLaMA {args.layers} layers d {args.hidden} "
          f"vocab {cfg.vocab_size}, {args.precision}; {C.describe_machine(device)}; wall {wall:.2f} s, "
          f"in operators {total:.2f} s (self time)")
    phases = sorted((e for e in events if e.key.startswith("phase: ")), key=lambda e: -e.cpu_time_total)
    C.print_table(["phase (wall, operators inside included)", "s", "share of wall"],
                  [[e.key[7:], f"{e.cpu_time_total / 1e6:.3f}", f"{100 * e.cpu_time_total / 1e6 / wall:.1f}%"]
                   for e in phases])
    events = [e for e in events if not e.key.startswith("phase: ")]
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:args.top]
    C.print_table(["operator", "calls", "self s", "share"],
                  [[e.key, e.count, f"{getattr(e, key) / 1e6:.3f}", f"{100 * getattr(e, key) / 1e6 / wall:.1f}%"]
                   for e in top])
    groups = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += getattr(e, key) / 1e6
    if not use_cuda:
        groups["outside operators (Python, profiler)"] = max(0.0, wall - total)
    rows = sorted(groups.items(), key=lambda kv: -kv[1])
    C.print_table(["group", "s", "share of wall"], [[g, f"{s:.3f}", f"{100 * s / wall:.1f}%"] for g, s in rows])
    figures = {"wall_s": round(wall, 3), **{f"share {g}": round(s / wall, 4) for g, s in rows},
               **{f"share {e.key}": round(e.cpu_time_total / 1e6 / wall, 4) for e in phases}}
    C.emit_json(figures)
    return figures


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
