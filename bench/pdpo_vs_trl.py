"""Vanilla DPO through our train.py against TRL's DPOTrainer, and the cost of personalization.

    python bench/pdpo_vs_trl.py                 # tiny LLaMA, 48 pairs, 12 steps of 4 pairs, 3 alternating rounds
    python bench/pdpo_vs_trl.py --quick         # seconds: smoke test

Same tiny LLaMA-style checkpoint (written by model.save_pretrained, read by transformers), same preference
pairs (prompts and responses of varied length, 10 users), same batch size, max length, precision, optimizer
(AdamW, lr, clipping 1.0), same number of steps. Nothing is truncated on either side, and TRL's prompts get
the same BOS token ours adds, so both sides train on the same token sequences (the table checks the count).

What each side computes per step of B pairs (full fine-tuning, beta 0.1, sigmoid/DPO loss):
  TRL DPOTrainer (1.x defaults, gradient checkpointing turned off as ours): one forward+backward of the 2B rows
    [prompt chosen] and [prompt rejected], chosen and rejected concatenated into one batch, right-padded to the
    longest row of a randomly drawn batch, with an attention mask (so SDPA gets a mask tensor); a no-grad
    forward of the same 2B rows through a second, frozen copy of the model (the reference); its fused LM head
    scores the log-probs of every position in tiles (on CPU every position, prompt and padding included, and
    also entropy, mean logit and top-1 metrics; on CUDA only completion positions).
  ours, vanilla DPO (train.py --user-model uniform --n-user-tokens 0 --alpha 1): one forward+backward of the
    same 2B rows concatenated, from length-bucketed batches (data.make_batches), right-padded with no mask
    (SDPA's causal path), the LM head applied only at positions that predict a response token; reference
    log-probs computed once before training (--precompute-reference, the default; policy == reference at
    step 0) in no-grad batches of max(B, 8), so no reference pass per step and no second copy of the model.
  ours, --no-precompute-reference: as above plus a no-grad reference forward per step: the same work as TRL.
  ours, P-DPO (individual user model, T_u = 1, alpha 0.5): eq. (pdpo) needs the personalized and the generic
    term, so 4B rows per forward+backward (2x vanilla), plus the reference pass when not precomputed
    (then 1.75x vanilla with an online reference: (2 * 3 + 1) / (3 + 1), counting a backward as 2 forwards).
  ours, P-DPO --generic-sampling: each pair draws one of the two terms (personalized w.p. alpha): 2B rows,
    an unbiased estimate of eq. (pdpo) at vanilla-DPO cost.

Throughput = pairs per second of training steps after the first two (warm-up), from the times between
optimizer steps (a global torch.optim post-step hook, the same for both sides). The one-off reference
precompute of ours is timed apart and shown as its share of a 2-epoch run (the paper trains 2 epochs).
Peak memory = peak resident memory of the worker process minus its resident memory after imports (CPU),
or torch.cuda.max_memory_allocated (CUDA). Each measurement runs in a fresh process; the arms alternate
over the rounds (A B C ..., then reversed) and the table shows medians.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import common as C
from examples import toy as toy_tasks

SCRIPT = Path(__file__).resolve()

ARMS = {  # name -> (side, train.py overrides); see the module docstring for what each computes
    "trl_dpo": ("trl", {}),
    "ours_dpo": ("ours", dict(user_model="uniform", n_user_tokens=0, alpha=1.0)),
    "ours_dpo_online_ref": ("ours", dict(user_model="uniform", n_user_tokens=0, alpha=1.0,
                                         precompute_reference=False)),
    "ours_pdpo": ("ours", dict(user_model="individual", n_user_tokens=1, alpha=0.5)),
    "ours_pdpo_online_ref": ("ours", dict(user_model="individual", n_user_tokens=1, alpha=0.5,
                                          precompute_reference=False)),
    "ours_pdpo_sampled": ("ours", dict(user_model="individual", n_user_tokens=1, alpha=0.5, generic_sampling=True)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="d of the tiny LLaMA")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024, help="size of the toy byte-level BPE")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (B)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (one epoch: steps * B pairs)")
    p.add_argument("--max-sentences", type=int, default=8, help="prompts and responses hold 1..this toy sentences")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over all arms")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--workdir", default="", help="where the checkpoint and pairs go (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke test: a tiny model, 4 steps, 1 round")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.steps, args.rounds, args.max_sentences = 32, 1, 300, 4, 1, 2
    return args


# ----------------------------------------------------------------------------------------------
# Set-up: one checkpoint and one set of pairs for every arm


def make_pairs(n: int, max_sentences: int, seed: int = 0, n_users: int = 10):
    """n preference pairs of varied length built from the toy corpus; 70% of users prefer the longer answer."""
    import data

    rng = random.Random(seed)
    sentences = toy_tasks.toy_corpus_texts(seed, n_examples=400)[1:]
    users = {f"user_{i:02d}": ("long" if i <= round(0.7 * n_users) else "short") for i in range(1, n_users + 1)}

    def text(k):
        return "".join(rng.choice(sentences) for _ in range(k))

    pairs = []
    for i in range(n):
        user = f"user_{i % n_users + 1:02d}"
        a, b = text(rng.randint(1, max_sentences)), text(rng.randint(1, max_sentences))
        longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
        chosen, rejected = (longer, shorter) if users[user] == "long" else (shorter, longer)
        if chosen == rejected:
            rejected = rejected + text(1)
        pairs.append(data.Pair(user, text(rng.randint(1, max_sentences)), chosen, rejected, group=users[user]))
    return pairs


def prepare(args, workdir: Path) -> dict:
    import data
    import model as lm

    tokenizer = data.train_bpe_tokenizer(toy_tasks.toy_corpus_texts(0, n_examples=2000), args.vocab,
                                         out_dir=workdir / "base")
    cfg = C.llama_config(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=tokenizer.vocab_size,
                         max_positions=4096)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    lm.save_pretrained(lm.build_model(cfg, seed=0), workdir / "base")
    pairs = make_pairs(args.steps * args.batch_size, args.max_sentences)
    data.write_pairs(workdir / "train.jsonl", pairs)
    items, _ = data.tokenize_pairs(pairs, tokenizer, max_length=100_000, max_prompt_length=50_000)
    longest = max(it.length for it in items)
    return dict(items=items, longest=longest, params=sum(p.numel() for p in lm.build_model(cfg).parameters()),
                vocab=tokenizer.vocab_size, tokens=sum(2 + 2 * len(it.prompt_ids) + len(it.chosen_ids)
                                                       + len(it.rejected_ids) for it in items))


def padding_share(items, batch_size: int, bucketed: bool, seed: int = 0) -> float:
    """Share of the 2B x T tensor that is padding, over one epoch of batches: ours (length-bucketed) or
    random batches as TRL's sampler draws them."""
    import data

    if bucketed:
        batches = data.make_batches(items, batch_size, shuffle=True, seed=seed)
    else:
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    real = padded = 0
    for b in batches:
        rows = [1 + len(items[i].prompt_ids) + len(getattr(items[i], r)) for i in b for r in ("chosen_ids", "rejected_ids")]
        real += sum(rows)
        padded += len(rows) * max(rows)
    return 1 - real / padded


# ----------------------------------------------------------------------------------------------
# Workers: one arm, in a fresh process


def worker(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    arm = args.worker
    side, overrides = ARMS[arm]
    workdir = Path(args.workdir)
    device = C.pick_device(args.device)
    if side == "trl":
        import datasets  # noqa: F401  (imports before the baseline, like train's)
        import transformers  # noqa: F401
        import trl  # noqa: F401
    step_times = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *a: step_times.append(time.perf_counter()))
    baseline = C.rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = Path(tempfile.mkdtemp(prefix=f"{arm}-", dir=workdir))
    common = dict(lr=1e-4, beta=0.1, max_length=100_000, seed=0)
    extra = {}
    if side == "ours":
        fields = dict(stage="pdpo", model=str(workdir / "base"), data=str(workdir / "train.jsonl"), out=str(out),
                      batch_size=args.batch_size, grad_accum=1, max_steps=args.steps, warmup_steps=2,
                      precision=args.precision, quiet=True, device=device, max_prompt_length=50_000,
                      reference_cache="off", **common, **overrides)  # every run pays its own precompute
        C.run_train_script(**fields)
        timing = json.loads((out / "timing.json").read_text())  # the one-off precompute, timed by train.py
        extra["precompute_s"] = timing["reference_s"] if fields.get("precompute_reference", True) else 0.0
    else:
        r = C.run_trl_dpo(workdir / "base", workdir / "train.jsonl", out, device, batch_size=args.batch_size,
                          precision=args.precision, lr=common["lr"], beta=common["beta"],
                          max_length=common["max_length"], seed=common["seed"], warmup_steps=2,
                          max_steps=args.steps)
        extra["tokens"] = r["tokens"]
    steady = [b - a for a, b in zip(step_times[2:], step_times[3:])]  # intervals after two warm-up steps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else C.peak_rss_mb() - baseline)
    C.emit_json({"arm": arm, "pairs_per_s": args.batch_size / (sum(steady) / len(steady)), "steps": len(step_times),
                 "peak_mb": peak, **extra})


# ----------------------------------------------------------------------------------------------
# The benchmark: alternate arms in fresh processes, report medians and ratios


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    device = C.pick_device(args.device)
    arms = args.arms.split(",")
    tmp = None
    if not args.workdir:
        tmp = tempfile.TemporaryDirectory(prefix="pdpo_vs_trl-")
        args.workdir = tmp.name
    workdir = Path(args.workdir)
    setup = prepare(args, workdir)
    print(f"pdpo_vs_trl: tiny LLaMA {args.layers} layers, d {args.hidden}, {setup['params']:,} parameters, vocab "
          f"{setup['vocab']}; {len(setup['items'])} pairs, rows up to {setup['longest']} tokens, batch {args.batch_size}, "
          f"{args.steps} steps, {args.precision}; {device}; {args.rounds} alternating rounds, a fresh process per run")
    passthrough = ["--workdir", str(workdir), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--precision", args.precision, "--device", device, "--threads", str(args.threads)]
    results = C.run_arms(SCRIPT, arms, passthrough, args.rounds)
    med = {arm: {k: C.median([x[k] for x in runs]) for k in ("pairs_per_s", "peak_mb")} for arm, runs in results.items()}
    for arm, runs in results.items():
        med[arm]["pairs_s_spread"] = C.spread([x["pairs_per_s"] for x in runs])
        if "precompute_s" in runs[0]:
            med[arm]["precompute_s"] = C.median([x["precompute_s"] for x in runs])
    n_pairs = len(setup["items"])

    def two_epoch_rate(arm):  # pairs/s over a 2-epoch run, the one-off precompute included
        m = med[arm]
        return 2 * n_pairs / (2 * n_pairs / m["pairs_per_s"] + m.get("precompute_s", 0.0))

    rows = []
    for arm in arms:
        m = med[arm]
        rows.append([arm, f"{m['pairs_per_s']:.2f} ({m['pairs_s_spread']})", f"{two_epoch_rate(arm):.2f}",
                     f"{m.get('precompute_s', 0):.1f}", f"{m['peak_mb']:.0f}"])
    C.print_table(["arm", "pairs/s steady (min-max)", "pairs/s, 2 epochs incl. precompute", "precompute s",
                   "peak memory MiB"], rows)
    figures = {f"{arm}_pairs_per_s": round(med[arm]["pairs_per_s"], 3) for arm in arms}
    figures.update({f"{arm}_peak_mb": round(med[arm]["peak_mb"], 1) for arm in arms})

    def ratio(name, a, b, fn=lambda arm: med[arm]["pairs_per_s"]):
        if a in med and b in med:
            figures[name] = round(fn(a) / fn(b), 3)

    ratio("dpo_speedup_vs_trl", "ours_dpo", "trl_dpo")
    ratio("dpo_speedup_vs_trl_2_epochs", "ours_dpo", "trl_dpo", two_epoch_rate)
    ratio("dpo_online_ref_speedup_vs_trl", "ours_dpo_online_ref", "trl_dpo")
    ratio("dpo_memory_vs_trl", "ours_dpo", "trl_dpo", lambda arm: med[arm]["peak_mb"])
    ratio("pdpo_cost_vs_dpo", "ours_dpo", "ours_pdpo")  # time per pair of P-DPO / vanilla DPO
    ratio("pdpo_cost_vs_dpo_online_ref", "ours_dpo_online_ref", "ours_pdpo_online_ref")
    ratio("pdpo_sampled_cost_vs_dpo", "ours_dpo", "ours_pdpo_sampled")
    ratio("pdpo_sampled_speedup_vs_exact", "ours_pdpo_sampled", "ours_pdpo")
    figures["padding_share_ours"] = round(padding_share(setup["items"], args.batch_size, bucketed=True), 3)
    figures["padding_share_random_batches"] = round(padding_share(setup["items"], args.batch_size, bucketed=False), 3)
    tokens = [x.get("tokens") for x in results.get("trl_dpo", []) if x.get("tokens")]
    if tokens:
        figures["tokens_ours"], figures["tokens_trl"] = setup["tokens"], tokens[0]
    print(f"\nratios (throughput a / b; cost = time per pair relative to vanilla DPO):")
    for k, v in figures.items():
        if not k.endswith(("_pairs_per_s", "_peak_mb")):
            print(f"  {k}: {v}")
    figures["config"] = dict(hidden=args.hidden, layers=args.layers, batch_size=args.batch_size, steps=args.steps,
                             rounds=args.rounds, precision=args.precision, device=device)
    C.emit_json(figures)
    if tmp:
        tmp.cleanup()
    return figures


if __name__ == "__main__":
    main()
