"""The demo (`python train.py`, `--example toy-style`): the paper's first experiment in miniature, on a CPU.

A tiny LLaMA is trained from scratch on a toy task (toy.py): SFT on every kind of answer, then vanilla DPO and
P-DPO from that SFT model with `--recipe tiny`; both are scored per group on held-out pairs, and answer every
held-out prompt greedily as each pair's user. Results and their history: docs/experiments/toy.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import data
import model as lm
import prlhf
import runs
from examples.toy import TOY_TASKS, preferred_answers, toy_answer_kind, toy_corpus_texts, toy_topic
from train import TrainConfig, train


DEMO = dict(seed=0, out="runs/demo", task="length", vocab_size=768, model=lm.TINY_LLAMA)
TASK_NOTES = {"length": "70% prefer long answers, 30% short", "style": "50% formal, 30% casual, 20% poetic"}


def demo(seed: int = DEMO["seed"], out: str = DEMO["out"], quiet: bool = False, task: str = DEMO["task"],
         precision: str = "fp32") -> dict:
    """The paper's first experiment in miniature, on a CPU: conflicting preferences.

    task "length": 70% of known users prefer long answers, 30% short (make_toy_task); "style":
    three groups of 50/30/20% want the same answer in different styles (make_style_task). A tiny
    LLaMA-style model is fine-tuned on every kind of answer (SFT), then trained from that SFT model with
    vanilla DPO (uniform user model without embedding, alpha = 1) and with P-DPO (individual user model,
    alpha = 0.5), both with --recipe tiny. Both are evaluated on held-out pairs of known and unseen
    users, and generate a greedy answer to every held-out prompt, as each pair's user.
    """
    t0 = time.perf_counter()
    # tiny matrices: one thread beats two, and does not collapse when another process wants a core
    torch.set_num_threads(1)
    out = Path(out)
    data_dir, base = out / "data", out / "base"
    train_pairs, valid_pairs = TOY_TASKS[task](seed=seed)
    data.write_pairs(data_dir / "train.jsonl", train_pairs)
    data.write_pairs(data_dir / "valid.jsonl", valid_pairs)
    tokenizer = data.train_bpe_tokenizer(toy_corpus_texts(seed, task=task), DEMO["vocab_size"], out_dir=base)
    cfg = lm.ModelConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **DEMO["model"])
    lm.save_pretrained(lm.build_model(cfg, seed=seed), base)
    common = dict(data=str(data_dir / "train.jsonl"), seed=seed, quiet=quiet, max_length=96, max_prompt_length=32,
                  recipe="tiny", precision=precision)
    n_users = len({p.user for p in train_pairs})
    print(f"demo ({task}): {len(train_pairs)} training pairs from {n_users} users ({TASK_NOTES[task]}); "
          f"tiny LLaMA with {sum(p.numel() for p in lm.build_model(cfg).parameters()):,} parameters; --recipe tiny")
    train(TrainConfig.from_recipe(stage="sft", model=str(base), out=str(out / "sft"), sft_on="both", **common))
    preference = dict(stage="pdpo", model=str(out / "sft"), valid=str(data_dir / "valid.jsonl"), **common)
    train(TrainConfig.from_recipe(out=str(out / "dpo"), **prlhf.VANILLA_DPO, **preference))
    train(TrainConfig.from_recipe(out=str(out / "pdpo"), user_model="individual", alpha=0.5, **preference))
    results = {method: demo_results(out / method, valid_pairs, task, quiet) for method in ("dpo", "pdpo")}
    runs.atomic_write_json(results, out / "results.json")
    print_demo_table(results)
    for method in ("dpo", "pdpo"):  # a few answers to read, one per group
        gens = [json.loads(line) for line in open(out / method / "generations.jsonl")]
        for group in dict.fromkeys(g["group"] for g in gens):
            g = next(g for g in gens if g["group"] == group)
            print(f"{method:<5} {g['user']} ({group}): {g['prompt'].strip()} ->{g['response']}")
    print(f"wrote {out}/results.json and runs sft, dpo, pdpo in {time.perf_counter() - t0:.0f} s")
    return results


def demo_results(run_dir: Path, valid_pairs: list, task: str, quiet: bool) -> dict:
    """toy.preferred_answers with the toy task's answer kinds (toy_answer_kind)."""
    return preferred_answers(run_dir, valid_pairs, lambda pair, answer: toy_answer_kind(task, toy_topic(pair.chosen),
                                                                                        answer), quiet=quiet)


def print_demo_table(results: dict):
    print(f"\n{'method':<8}{'group':<10}{'pairs':>6}{'accuracy':>10}{'response tokens':>17}{'answers as preferred':>22}")
    for method, r in results.items():
        for group, s in r["groups"].items():
            preferred = "-" if s["answers_as_preferred"] is None else f"{s['answers_as_preferred']:.3f}"
            print(f"{method:<8}{group:<10}{s['pairs']:>6}{s['accuracy']:>10.3f}{s['mean_response_tokens']:>17.1f}"
                  f"{preferred:>22}")
    for method, r in results.items():
        print(f"{method}: clean answers (exactly one of the task's answers) {r['clean_answers']:.3f} "
              f"of {r['answers']} prompts")
