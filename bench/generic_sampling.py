"""--generic-sampling against exact P-DPO on the demo task: per-group accuracy over seeds, and the cost.

    python bench/generic_sampling.py               # 3 seeds: SFT, then exact and sampled P-DPO from it (minutes)
    python bench/generic_sampling.py --quick       # 1 seed, a smaller task and fewer epochs (smoke test)

Exact P-DPO, eq. (pdpo), runs every pair through the policy twice, with the user's embedding e_u and with the
generic e_0, and mixes the two losses by alpha: 4B rows per step. train.py --generic-sampling lets each pair
draw one of the two terms, e_u with probability alpha, else e_0: 2B rows per step, the same expected loss
(an unbiased estimate of eq. (pdpo)), more variance. The question here is whether the variance costs accuracy.

Per seed: the demo task (toy_tasks.make_toy_task: 10 known users, 70% prefer long answers, 30% short; validation
pairs of the known users and of 4 unseen users), the demo's tiny LLaMA (model.TINY_LLAMA) fine-tuned with SFT on
both kinds of answer, then P-DPO (individual user model, T_u = 1, alpha 0.5) from that SFT model, exact and
sampled, with the same seed, data order and hyperparameters, each run through train.py's command line.
Accuracy = share of
validation pairs whose implicit personalized reward prefers the user's chosen answer, per group. Sampling is
within noise when the mean difference over seeds is at most twice the noise of one accuracy: the larger of
the seed-to-seed standard deviation (of either method) and one validation pair of the group (1 / pairs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common as C
from examples import toy as toy_tasks
import data
import model as lm

VOCAB_SIZE = 768  # the demo's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--pairs-per-user", type=int, default=60, help="training pairs per known user (the demo's)")
    p.add_argument("--sft-epochs", type=float, default=4.0)
    p.add_argument("--pdpo-epochs", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's tiny matrices: 1 is fastest)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--workdir", default="", help="where runs go (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="1 seed, 12 pairs per user, 1 epoch each (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.pairs_per_user, args.sft_epochs, args.pdpo_epochs = "0", 12, 1.0, 1.0
    return args


def run_seed(seed: int, args, root: Path, device: str) -> dict:
    out = root / f"seed{seed}"
    train_pairs, valid_pairs = toy_tasks.make_toy_task(seed=seed, pairs_per_user=args.pairs_per_user)
    data.write_pairs(out / "train.jsonl", train_pairs)
    data.write_pairs(out / "valid.jsonl", valid_pairs)
    tokenizer = data.train_bpe_tokenizer(toy_tasks.toy_corpus_texts(seed), VOCAB_SIZE, out_dir=out / "base")
    cfg = lm.ModelConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.pad_id, **lm.TINY_LLAMA)
    lm.save_pretrained(lm.build_model(cfg, seed=seed), out / "base")
    common = dict(data=str(out / "train.jsonl"), seed=seed, quiet=True, max_length=96, max_prompt_length=32,
                  device=device)
    C.run_train_script(stage="sft", model=str(out / "base"), out=str(out / "sft"), sft_on="both", lr=3e-3,
                       warmup_steps=10, epochs=args.sft_epochs, batch_size=16, grad_accum=1, **common)
    pdpo = dict(stage="pdpo", model=str(out / "sft"), valid=str(out / "valid.jsonl"), beta=0.1, lr=5e-4, user_lr=1e-2,
                warmup_steps=10, epochs=args.pdpo_epochs, batch_size=8, grad_accum=1, user_model="individual",
                n_user_tokens=1, alpha=0.5, **common)
    result = {}
    for name, sampling in (("exact", False), ("sampled", True)):
        t0 = time.perf_counter()
        run = C.run_train_script(out=str(out / name), generic_sampling=sampling, **pdpo)
        summary = json.loads((run / "eval.json").read_text())
        result[name] = {"seconds": time.perf_counter() - t0,
                        **{g: s["accuracy"] for g, s in summary["groups"].items()},
                        "pairs": {g: s["pairs"] for g, s in summary["groups"].items()}}
    return result


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.device)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="generic_sampling-") if not args.workdir else None
    root = Path(args.workdir or tmp.name)
    print(f"generic_sampling: demo task, 10 users x {args.pairs_per_user} pairs, seeds {seeds}; "
          f"SFT {args.sft_epochs} epochs, P-DPO {args.pdpo_epochs} epochs (alpha 0.5, individual, T_u 1); {device}")
    results = {seed: run_seed(seed, args, root, device) for seed in seeds}
    groups = [g for g in results[seeds[0]]["exact"] if g not in ("seconds", "pairs")]
    rows = []
    for seed in seeds:
        for name in ("exact", "sampled"):
            r = results[seed][name]
            rows.append([seed, name] + [f"{r[g]:.3f}" for g in groups] + [f"{r['seconds']:.0f}"])
    C.print_table(["seed", "P-DPO"] + [f"accuracy {g}" for g in groups] + ["train s"], rows)
    figures, summary_rows = {}, []
    for g in groups:
        exact = [results[s]["exact"][g] for s in seeds]
        sampled = [results[s]["sampled"][g] for s in seeds]
        diff = statistics.mean(sampled) - statistics.mean(exact)
        one_pair = 1 / min(results[s]["exact"]["pairs"][g] for s in seeds)
        seed_std = max(statistics.stdev(exact), statistics.stdev(sampled)) if len(seeds) > 1 else 0.0
        noise = max(seed_std, one_pair)
        figures[f"{g}_exact_mean"] = round(statistics.mean(exact), 4)
        figures[f"{g}_sampled_mean"] = round(statistics.mean(sampled), 4)
        figures[f"{g}_diff"] = round(diff, 4)
        figures[f"{g}_noise"] = round(noise, 4)
        summary_rows.append([g, f"{statistics.mean(exact):.3f}", f"{statistics.mean(sampled):.3f}", f"{diff:+.3f}",
                             f"{seed_std:.3f}", f"{one_pair:.3f}", "yes" if abs(diff) <= 2 * noise else "no"])
    C.print_table(["group", "exact mean", "sampled mean", "sampled - exact", "seed std (max of both)",
                   "one pair (1/n)", "within 2 x noise"], summary_rows, title="over seeds")
    time_ratio = statistics.median(results[s]["sampled"]["seconds"] / results[s]["exact"]["seconds"] for s in seeds)
    figures["sampled_time_ratio"] = round(time_ratio, 3)
    print(f"\ntraining time, sampled / exact (median over seeds; includes the reference precompute and the "
          f"evaluation, which both share): {time_ratio:.2f}")
    figures["within_noise"] = all(r[-1] == "yes" for r in summary_rows)
    figures["config"] = dict(seeds=seeds, pairs_per_user=args.pairs_per_user, sft_epochs=args.sft_epochs,
                             pdpo_epochs=args.pdpo_epochs, device=device)
    C.emit_json(figures)
    if tmp:
        tmp.cleanup()
    return figures


if __name__ == "__main__":
    main()
