"""TL;DR-shaped training throughput: long prompts, short responses, two epochs with every reference pass.

    python bench/tldr_shaped.py                  # 64 pairs, prompts 400 +- 100 tokens, responses 30 +- 15, ~58M LLaMA
    python bench/tldr_shaped.py --tiny           # seconds: a 1-layer model, 4 short pairs (the test's mode)

The paper's TL;DR task (Reddit posts summarised) has prompts of a few hundred tokens and responses of a few
dozen, so how a step lays out the prompt decides its cost. One run trains every arm on the same random-token
pairs (several users), the same random-weight LLaMA-style checkpoint (model.save_pretrained; transformers reads
it for TRL), batch size, lengths (nothing truncated), precision, optimizer settings and seed, each arm in a
fresh process:
  trl_dpo        TRL's DPOTrainer, vanilla DPO (common.run_trl_dpo): 2B rows [prompt response] per step and a
                 no-grad reference forward of the same rows at every step.
  dpo_two_row    ours, vanilla DPO (train.py --user-model uniform --n-user-tokens 0 --alpha 1): 2B rows
                 [BOS prompt response], reference log-probs precomputed once before training.
  pdpo_two_row   ours, exact P-DPO (--user-model individual --n-user-tokens 1 --alpha 0.5, no
                 --generic-sampling): eq. (pdpo)'s personalized and generic terms, 4B rows [BOS e_u prompt response].
  dpo_shared, pdpo_shared   the same two with --shared-prompt: one row [BOS e_u prompt chosen rejected] per pair
                 and term; the two-row arms pass --no-shared-prompt.
Our arms run with --reference-cache off and a fresh run directory, so each pays its own reference pass.

Time of an arm = wall seconds of two epochs, reference included: ours, timing.json's reference_s (the one-off
precompute) + the last elapsed_s of metrics.jsonl (the training loop up to its last optimizer step; writing
the run directory afterwards is not counted); TRL, the wall time of trainer.train(). Throughput = 2 N / time.
Policy tokens per pair and term: rows x positions of every forward with gradients (common.count_policy_tokens,
padding and T_u included) / (2 epochs x N pairs x terms), against the floor 1 + T_u + |x| + |y_w| + |y_l|
(BOS, user token, prompt, both responses with their EOS: the prompt once).
Goals printed: vanilla DPO (ours) / TRL throughput >= 2; exact P-DPO / vanilla DPO time <= 1.6, per path.
The table, the ratios and, last, a JSON line go to stdout; the JSON also to bench/results/tldr_shaped-DATE.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import tempfile
from pathlib import Path

import common as C

SCRIPT = Path(__file__).resolve()
EPOCHS = 2  # the paper trains two epochs
VANILLA = dict(user_model="uniform", n_user_tokens=0, alpha=1.0)
EXACT_PDPO = dict(user_model="individual", n_user_tokens=1, alpha=0.5, generic_sampling=False)
ARMS = {  # name -> (side, train.py overrides, terms of eq. (pdpo) the policy computes per pair)
    "trl_dpo": ("trl", {}, 1),
    "dpo_two_row": ("ours", dict(VANILLA, shared_prompt=False), 1),
    "pdpo_two_row": ("ours", dict(EXACT_PDPO, shared_prompt=False), 2),
    "dpo_shared": ("ours", dict(VANILLA, shared_prompt=True), 1),
    "pdpo_shared": ("ours", dict(EXACT_PDPO, shared_prompt=True), 2),
}
TINY = dict(layers=1, hidden=32, heads=2, vocab=64, pairs=4, batch_size=2, users=2, prompt_len=8, prompt_spread=2,
            response_len=4, response_spread=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(p)  # 8 layers, d 512, vocab 32000: ~58M parameters
    p.add_argument("--pairs", type=int, default=64, help="N, training pairs (one epoch)")
    p.add_argument("--users", type=int, default=8, help="users the pairs are spread over")
    p.add_argument("--prompt-len", type=int, default=400, help="mean prompt length |x|, tokens (BOS not counted)")
    p.add_argument("--prompt-spread", type=int, default=100, help="|x| uniform in mean +- this")
    p.add_argument("--response-len", type=int, default=30, help="mean response length, tokens before EOS")
    p.add_argument("--response-spread", type=int, default=15,
                   help="|y_w| and |y_l| drawn independently, uniform in mean +- this")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (B)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and training")
    p.add_argument("--rounds", type=int, default=1, help="runs per arm, alternating the order; medians shown")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    p.add_argument("--workdir", default="", help="where the checkpoint, pairs and runs go (default: a temp dir)")
    p.add_argument("--json-out", default="", help="default: bench/results/tldr_shaped-DATE.json")
    p.add_argument("--tiny", action="store_true", help="smoke test: " + ", ".join(f"{k} {v}" for k, v in TINY.items())
                   + " (flags given override these)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: run one arm in this process
    if "--tiny" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**TINY)
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms {args.arms}: unknown {', '.join(unknown)}; expected a subset of {', '.join(ARMS)}")
    return args


# ----------------------------------------------------------------------------------------------
# Set-up: one checkpoint, one tokenizer, one set of pairs for every arm


def word_tokenizer(vocab: int, out_dir: Path):
    """One token per word: "t17 t503" is exactly [17, 503], so lengths are set by the text. <s> </s> <pad>
    are ids 0, 1, 2 (model.py's llama config, common.llama_config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    import data

    specials = ["<s>", "</s>", "<pad>"]
    words = {**{s: i for i, s in enumerate(specials)}, **{f"t{i}": i for i in range(len(specials), vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    tokenizer = data.Tokenizer(backend=backend, bos_id=0, eos_id=1, pad_id=2)
    tokenizer.save(out_dir)
    return tokenizer


def make_pairs(args):
    """N pairs of random words: |x| = prompt_len +- prompt_spread, |y_w| and |y_l| independently
    response_len +- response_spread (at least 1); pair i from user i % users + 1."""
    import data

    rng = random.Random(args.seed)

    def text(mean, spread):
        return " ".join(f"t{rng.randrange(3, args.vocab)}" for _ in range(max(1, rng.randint(mean - spread,
                                                                                              mean + spread))))

    pairs = []
    for i in range(args.pairs):
        prompt, chosen = text(args.prompt_len, args.prompt_spread), text(args.response_len, args.response_spread)
        rejected = chosen
        while rejected == chosen:
            rejected = text(args.response_len, args.response_spread)
        # a space before each response: TRL tokenizes prompt + response as one text, ours each alone
        pairs.append(data.Pair(f"user_{i % args.users + 1}", prompt, " " + chosen, " " + rejected))
    return pairs


def prepare(args, workdir: Path) -> dict:
    import data
    import model as lm

    tokenizer = word_tokenizer(args.vocab, workdir / "base")
    longest = 2 + args.prompt_len + args.prompt_spread + 2 * (args.response_len + args.response_spread + 1)
    cfg = C.llama_config(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
                         max_positions=max(2048, longest))
    model = lm.build_model(cfg, seed=args.seed)
    lm.save_pretrained(model, workdir / "base")
    pairs = make_pairs(args)
    data.write_pairs(workdir / "train.jsonl", pairs)
    items, _ = data.tokenize_pairs(pairs, tokenizer, max_length=100_000, max_prompt_length=50_000)
    return dict(items=items, params=sum(p.numel() for p in model.parameters()),
                tokens=sum(2 + 2 * len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids) for it in items))


def floor_per_term(items, n_user_tokens: int) -> float:
    """Mean over pairs of 1 + T_u + |x| + |y_w| + |y_l|: every token of a pair once, the prompt once."""
    return sum(1 + n_user_tokens + len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids)
               for it in items) / len(items)


# ----------------------------------------------------------------------------------------------
# Workers: one arm, two epochs, in a fresh process


def worker(args) -> dict:
    import torch

    import model as lm

    if args.threads:
        torch.set_num_threads(args.threads)
    side, overrides, _ = ARMS[args.worker]
    workdir, device = Path(args.workdir), C.pick_device(args.device)
    out = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=workdir))
    common = dict(lr=1e-4, beta=0.1, max_length=100_000, seed=args.seed, warmup_steps=2)
    if side == "trl":
        import transformers

        seen = C.count_policy_tokens((transformers.LlamaModel,))
        r = C.run_trl_dpo(workdir / "base", workdir / "train.jsonl", out, device, batch_size=args.batch_size,
                          precision=args.precision, epochs=EPOCHS, **common)
        result = {"time_s": r["train_s"], "reference_s": None, "tokens": r["tokens"]}
    else:
        seen = C.count_policy_tokens((lm.Transformer,))
        C.run_train_script(stage="pdpo", model=str(workdir / "base"), data=str(workdir / "train.jsonl"), out=str(out),
                           batch_size=args.batch_size, grad_accum=1, epochs=EPOCHS, precision=args.precision,
                           quiet=True, device=device, max_prompt_length=50_000, reference_cache="off",
                           **common, **overrides)
        reference_s = json.loads((out / "timing.json").read_text())["reference_s"]
        last = json.loads((out / "metrics.jsonl").read_text().strip().splitlines()[-1])
        result = {"time_s": reference_s + last["elapsed_s"], "reference_s": reference_s, "steps": last["step"]}
    C.emit_json({"arm": args.worker, **result, "policy_tokens": seen["tokens"], "policy_forwards": seen["forwards"]})
    return result


# ----------------------------------------------------------------------------------------------
# The benchmark


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    arms = args.arms.split(",")
    if args.workdir:
        return benchmark(args, arms, Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="tldr_shaped-") as workdir:
        return benchmark(args, arms, Path(workdir))


def benchmark(args, arms: list[str], workdir: Path) -> dict:
    """Set up in workdir, run the arms, print the table and ratios, write the JSON."""
    device = C.pick_device(args.device)
    setup = prepare(args, workdir)
    items, n = setup["items"], len(setup["items"])
    print(f"tldr_shaped: LLaMA {args.layers} layers, d {args.hidden}, vocab {args.vocab}, {setup['params']:,} "
          f"parameters, random weights; {n} pairs of {args.users} users, prompts {args.prompt_len} +- "
          f"{args.prompt_spread} tokens, responses {args.response_len} +- {args.response_spread} (+ EOS); batch "
          f"{args.batch_size}, {EPOCHS} epochs, {args.precision}, {device}; {C.describe_machine(device)}, workers "
          f"{args.threads or 'default'} thread(s); {args.rounds} round(s), a fresh process per run")
    passthrough = ["--workdir", str(workdir), "--batch-size", str(args.batch_size), "--precision", args.precision,
                    "--device", device, "--threads", str(args.threads), "--seed", str(args.seed)]
    results = C.run_arms(SCRIPT, arms, passthrough, args.rounds, track_memory=False)  # speed only: glibc's defaults

    figures, rows = {}, []
    for arm in arms:
        runs, (_, overrides, terms) = results[arm], ARMS[arm]
        time_s = C.median([r["time_s"] for r in runs])
        per_term = runs[0]["policy_tokens"] / (EPOCHS * n * terms)
        floor = floor_per_term(items, overrides.get("n_user_tokens", 0))
        reference_s = runs[0]["reference_s"]
        figures[arm] = {"time_s": round(time_s, 3), "pairs_per_s": round(EPOCHS * n / time_s, 3),
                        "reference_s": None if reference_s is None else round(C.median([r["reference_s"] for r in runs]), 3),
                        "policy_tokens_per_pair": round(per_term * terms, 2), "terms": terms,
                        "policy_tokens_per_pair_term": round(per_term, 2), "floor_per_pair_term": round(floor, 2)}
        f = figures[arm]
        rows.append([arm, f"{f['pairs_per_s']:.3f}", f"{f['time_s']:.1f}",
                     "in every step" if reference_s is None else f"{f['reference_s']:.1f}",
                     f"{f['policy_tokens_per_pair']:.1f}", terms, f"{per_term:.1f}", f"{floor:.1f}",
                     f"{per_term / floor:.2f}"])
    C.print_table(["arm", f"pairs/s, {EPOCHS} epochs incl. reference", "time s", "reference pass s",
                   "policy tokens / pair", "terms", "per term", "floor 1+T_u+x+y_w+y_l", "per term / floor"], rows)

    ratios = {}

    def ratio(name, a, b, key, goal, op):
        if a in figures and b in figures:
            value = figures[a][key] / figures[b][key]
            ratios[name] = {"value": round(value, 3), "goal": f"{op} {goal}",
                            "met": value >= goal if op == ">=" else value <= goal}

    for path in ("two_row", "shared"):
        ratio(f"dpo_{path}_vs_trl_throughput", f"dpo_{path}", "trl_dpo", "pairs_per_s", 2.0, ">=")
    for path in ("two_row", "shared"):
        ratio(f"pdpo_vs_dpo_time_{path}", f"pdpo_{path}", f"dpo_{path}", "time_s", 1.6, "<=")
    print("\nratios:")
    for name, r in ratios.items():
        print(f"  {name}: {r['value']:.2f} (goal {r['goal']}: {'met' if r['met'] else 'NOT met'})")
    trl_tokens = [r["tokens"] for r in results.get("trl_dpo", [])]
    if trl_tokens:
        same = trl_tokens[0] == setup["tokens"]
        print(f"  same token sequences for TRL and ours: {'yes' if same else 'NO'} ({trl_tokens[0]} vs {setup['tokens']})")
        figures["same_tokens_as_trl"] = same
    figures["ratios"] = ratios
    figures["config"] = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
                             parameters=setup["params"], pairs=n, users=args.users, prompt_len=args.prompt_len,
                             prompt_spread=args.prompt_spread, response_len=args.response_len,
                             response_spread=args.response_spread, batch_size=args.batch_size, epochs=EPOCHS,
                             precision=args.precision, seed=args.seed, rounds=args.rounds, device=device,
                             machine=C.describe_machine(device), threads=args.threads,
                             reference_cache="off")
    out = Path(args.json_out or C.ROOT / "bench" / "results" / f"tldr_shaped-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")
    C.emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
